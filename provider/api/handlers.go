package api

import (
	"bytes"
	"context"
	"crypto/x509"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
)

// Provider is what the server calls on the domain: exactly these methods of
// *provider.Provider, declared here so tests can hand in a fake.
type Provider interface {
	Status(ctx context.Context) (provider.Status, error)
	Backup(ctx context.Context, w io.Writer, passphrase []byte) (provider.BackupInfo, error)
	VerifyBackup(ctx context.Context, r io.Reader, passphrase []byte) (provider.BackupInfo, error)
	ConfirmBackup(ctx context.Context, sha256 string) (provider.BackupInfo, error)
	CreateToken(ctx context.Context, ttl time.Duration) (provider.Token, error)
	Enroll(ctx context.Context, req provider.EnrollRequest) (provider.EnrollResponse, error)
	CA(ctx context.Context) (*x509.Certificate, error)
	CAHash(ctx context.Context) (string, error)
	Hosts(ctx context.Context) ([]provider.Host, error)
	Revoke(ctx context.Context, hostID string) error
	AuthorizeHost(ctx context.Context, cert *x509.Certificate) (provider.Host, error)
	CheckRelease(ctx context.Context, cert *x509.Certificate) (provider.Host, string, error)
	ReleaseTo(ctx context.Context, cert *x509.Certificate) (provider.Host, []provider.ReleasedKDK, string, error)
	Rotate(ctx context.Context) (provider.KDKVersion, error)
	Retire(ctx context.Context, version int) error
	RegisterObject(ctx context.Context, hostID string, obj provider.Object) error
	UnregisterObject(ctx context.Context, hostID, vmUUID, name string) error
	MoveVM(ctx context.Context, hostID, vmUUID string) ([]provider.Object, error)
	ForgetVM(ctx context.Context, hostID, vmUUID string) (provider.ForgetResult, error)
	ForgetObjects(ctx context.Context, vmUUID, name string) ([]provider.Object, error)
	Objects(ctx context.Context, f provider.ObjectFilter) ([]provider.Object, error)
	Policy(ctx context.Context) (provider.Policy, error)
	SetPolicy(ctx context.Context, p provider.Policy) error
	AuditVerify(ctx context.Context) error
	Audit(ctx context.Context, n int) ([]audit.Record, error)
	IssueAdminCert(ctx context.Context, csr []byte) ([]byte, error)
	Admins(ctx context.Context) ([]provider.Admin, error)
	RevokeAdmin(ctx context.Context, ref string) ([]provider.Admin, error)
	AuthorizeAdmin(ctx context.Context, cert *x509.Certificate) error
	RenewHost(ctx context.Context, cert *x509.Certificate, csr []byte) (provider.EnrollResponse, error)
	PruneAudit(ctx context.Context, before time.Time, dryRun bool) (provider.AuditPrune, error)
}

// caHash is Provider.CAHash; a failure to read it becomes a 503 with a sentence.
func (s *Server) caHash(ctx context.Context) (string, error) {
	h, err := s.p.CAHash(ctx)
	if err != nil {
		return "", caError(err)
	}
	return h, nil
}

// caError answers a failure to read the provider's CA certificate from the store with 503
// (the provider cannot serve this now; retry), unless the domain said more precisely why.
func caError(err error) error {
	if status, _, _ := classify(err); status != http.StatusInternalServerError {
		return err
	}
	return &codedError{status: http.StatusServiceUnavailable, code: apiv1.CodeUnavailable, cause: err,
		msg: "the provider cannot read its CA certificate from its store right now; retry shortly (the provider's log has the cause)"}
}

func (s *Server) handleEnroll(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.EnrollRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.m.enrolls.WithLabelValues(apiv1.CodeBadRequest).Inc()
		s.writeError(w, r, err)
		return
	}
	resp, err := s.p.Enroll(r.Context(), provider.EnrollRequest{
		Token: req.Token, CSR: req.CSR, Hostname: req.Hostname, EKPublic: req.EKPublic,
	})
	if err != nil {
		_, code, _ := classify(err)
		s.m.enrolls.WithLabelValues(code).Inc()
		s.writeError(w, r, err)
		return
	}
	s.m.enrolls.WithLabelValues("ok").Inc()
	s.writeJSON(w, http.StatusOK, apiv1.EnrollResponse{HostID: resp.HostID, Certificate: resp.Certificate, CAChain: resp.CAChain})
}

// handleRelease authenticates the host as Server.host does and releases its KDKs, in one
// call of the domain. With ?known=KEYSET it first checks read-only (Provider.CheckRelease)
// and answers Unchanged, without keys, while that set is current.
func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request) {
	cert, err := peerCert(r, ca.RoleHost)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if known := r.URL.Query().Get("known"); known != "" {
		_, set, err := s.p.CheckRelease(r.Context(), cert)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		if set == known {
			s.m.releases.WithLabelValues("unchanged").Inc()
			s.writeJSON(w, http.StatusOK, apiv1.ReleaseResponse{KDKs: []apiv1.KDK{}, KeySet: set, Unchanged: true})
			return
		}
	}
	_, kdks, set, err := s.p.ReleaseTo(r.Context(), cert)
	if err != nil {
		s.writeError(w, r, authError(cert, ca.RoleHost, err))
		return
	}
	out := apiv1.ReleaseResponse{KDKs: make([]apiv1.KDK, 0, len(kdks)), KeySet: set}
	for _, k := range kdks {
		form := "import_blob"
		if len(k.ImportBlob) == 0 {
			form = "bare"
		}
		s.m.releases.WithLabelValues(form).Inc()
		out.KDKs = append(out.KDKs, apiv1.KDK{ID: k.ID, Version: k.Version, Primary: k.Primary, ImportBlob: k.ImportBlob, Bare: k.Bare})
	}
	s.writeJSON(w, http.StatusOK, out)
	for _, k := range kdks {
		clear(k.Bare)
	}
}

func (s *Server) handleRegisterObject(w http.ResponseWriter, r *http.Request, hostID string) {
	o, err := decodeBody[apiv1.Object](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	err = s.p.RegisterObject(r.Context(), hostID, provider.Object{VMUUID: o.VMUUID, Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID})
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleUnregisterObject(w http.ResponseWriter, r *http.Request, hostID string) {
	if err := s.p.UnregisterObject(r.Context(), hostID, r.PathValue("vm"), r.PathValue("name")); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleForgetVM(w http.ResponseWriter, r *http.Request, hostID string) {
	res, err := s.p.ForgetVM(r.Context(), hostID, r.PathValue("vm"))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	out := apiv1.ForgetResponse{Removed: objectsResponse(res.Removed).Objects}
	if len(res.Others) > 0 {
		out.Others = objectsResponse(res.Others).Objects
	}
	s.writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleForgetObjects(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.ForgetRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	objs, err := s.p.ForgetObjects(r.Context(), req.VMUUID, req.Name)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, objectsResponse(objs))
}

func (s *Server) handleMoveVM(w http.ResponseWriter, r *http.Request, hostID string) {
	m, err := decodeBody[apiv1.MoveRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	objs, err := s.p.MoveVM(r.Context(), hostID, m.VMUUID)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, objectsResponse(objs))
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	st, err := s.p.Status(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	hash, err := s.caHash(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, statusToWire(st, hash))
}

func (s *Server) handleBackup(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.BackupRequest](w, r, apiv1.MaxBodyBytes)
	defer clear(req.Passphrase)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var buf bytes.Buffer
	info, err := s.p.Backup(r.Context(), &buf, req.Passphrase)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	w.Header().Set(apiv1.HeaderArchiveSHA256, info.SHA256)
	w.Header().Set("Content-Type", apiv1.ContentTypeBinary)
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.Header().Set("Cache-Control", "no-store")
	w.Write(buf.Bytes())
}

// handleBackupConfirm marks a written backup as taken, once the admin has stored the
// archive and opened it again (provider.ConfirmBackup).
func (s *Server) handleBackupConfirm(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.BackupConfirmRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	info, err := s.p.ConfirmBackup(r.Context(), req.SHA256)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, backupInfoToWire(info))
}

func (s *Server) handleBackupVerify(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.ArchiveRequest](w, r, apiv1.MaxArchiveBodyBytes)
	defer clear(req.Passphrase)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	info, err := s.p.VerifyBackup(r.Context(), bytes.NewReader(req.Archive), req.Passphrase)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, backupInfoToWire(info))
}

// maxTokenTTL bounds join tokens' lifetime.
const maxTokenTTL = 7 * 24 * time.Hour

func (s *Server) handleCreateToken(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.TokenRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	ttl := time.Duration(req.TTLSeconds) * time.Second
	if ttl > maxTokenTTL {
		s.writeError(w, r, errBadRequestf("token lifetime %v is longer than the allowed %v", ttl, maxTokenTTL))
		return
	}
	hash, err := s.caHash(r.Context()) // before the token exists: a token without its pin is useless
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	t, err := s.p.CreateToken(r.Context(), ttl)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, apiv1.Token{ID: t.ID, Secret: t.Secret, Expires: t.Expires, CAHash: hash})
}

func (s *Server) handleHosts(w http.ResponseWriter, r *http.Request) {
	hosts, err := s.p.Hosts(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	out := apiv1.HostsResponse{Hosts: make([]apiv1.Host, 0, len(hosts))}
	for _, h := range hosts {
		out.Hosts = append(out.Hosts, hostToWire(h))
	}
	s.writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleRevoke(w http.ResponseWriter, r *http.Request) {
	if err := s.p.Revoke(r.Context(), r.PathValue("id")); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleRotate(w http.ResponseWriter, r *http.Request) {
	v, err := s.p.Rotate(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, kdkVersionToWire(v))
}

func (s *Server) handleRetire(w http.ResponseWriter, r *http.Request) {
	v, err := strconv.Atoi(r.PathValue("version"))
	if err != nil || v < 1 {
		s.writeError(w, r, errBadRequestf("KDK version %q: want a positive integer", r.PathValue("version")))
		return
	}
	if err := s.p.Retire(r.Context(), v); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleObjects(w http.ResponseWriter, r *http.Request) {
	f := provider.ObjectFilter{VMUUID: r.URL.Query().Get("vm")}
	if v := r.URL.Query().Get("kdk_version"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			s.writeError(w, r, errBadRequestf("kdk_version %q: want a positive integer", v))
			return
		}
		f.KDKVersion = n
	}
	objs, err := s.p.Objects(r.Context(), f)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, objectsResponse(objs))
}

func objectsResponse(objs []provider.Object) apiv1.ObjectsResponse {
	out := apiv1.ObjectsResponse{Objects: make([]apiv1.Object, 0, len(objs))}
	for _, o := range objs {
		out.Objects = append(out.Objects, objectToWire(o))
	}
	return out
}

// Audit listing bounds: GET /v1/admin/audit without n returns the last defaultAuditN
// records; n=0 or n above maxAuditN returns the last maxAuditN.
const (
	defaultAuditN = 100
	maxAuditN     = 10000
)

func (s *Server) handleAudit(w http.ResponseWriter, r *http.Request) {
	n := defaultAuditN
	if v := r.URL.Query().Get("n"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 0 {
			s.writeError(w, r, errBadRequestf("n %q: want a non-negative integer", v))
			return
		}
		if n == 0 || n > maxAuditN {
			n = maxAuditN
		}
	}
	recs, err := s.p.Audit(r.Context(), n)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	out := apiv1.AuditResponse{Records: make([]apiv1.AuditRecord, 0, len(recs))}
	for _, rec := range recs {
		out.Records = append(out.Records, apiv1.AuditRecord{Seq: rec.Seq, Time: rec.Time, Kind: string(rec.Kind),
			Actor: rec.Actor, Subject: rec.Subject, Details: rec.Details, Hash: rec.Hash})
	}
	s.writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleAuditVerify(w http.ResponseWriter, r *http.Request) {
	if err := s.p.AuditVerify(r.Context()); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handlePolicy(w http.ResponseWriter, r *http.Request) {
	p, err := s.p.Policy(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, policyToWire(p))
}

func (s *Server) handleSetPolicy(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.Policy](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := s.p.SetPolicy(r.Context(), policyFromWire(req)); err != nil {
		s.writeError(w, r, err)
		return
	}
	s.handlePolicy(w, r)
}

func (s *Server) handleAdmins(w http.ResponseWriter, r *http.Request) {
	as, err := s.p.Admins(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, adminsToWire(as))
}

func (s *Server) handleAdminCert(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.AdminCertRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	caCert, err := s.p.CA(r.Context())
	if err != nil {
		s.writeError(w, r, caError(err))
		return
	}
	der, err := s.p.IssueAdminCert(r.Context(), req.CSR)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, apiv1.AdminCertResponse{Certificate: der, CAChain: [][]byte{caCert.Raw}})
}

func (s *Server) handleRevokeAdmin(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.AdminRevokeRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	as, err := s.p.RevokeAdmin(r.Context(), req.Admin)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, adminsToWire(as))
}

// handleRenew issues an enrolled host a new certificate (Provider.RenewHost authorizes
// the one presented: a revoked host cannot renew).
func (s *Server) handleRenew(w http.ResponseWriter, r *http.Request) {
	cert, err := peerCert(r, ca.RoleHost)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if _, err := s.p.AuthorizeHost(r.Context(), cert); err != nil { // refuse before reading the body
		s.writeError(w, r, authError(cert, ca.RoleHost, err))
		return
	}
	req, err := decodeBody[apiv1.HostRenewRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	resp, err := s.p.RenewHost(r.Context(), cert, req.CSR)
	if err != nil {
		s.writeError(w, r, authError(cert, ca.RoleHost, err))
		return
	}
	s.log.Info("api: host certificate renewed", "host_id", resp.HostID)
	s.writeJSON(w, http.StatusOK, apiv1.EnrollResponse{HostID: resp.HostID, Certificate: resp.Certificate, CAChain: resp.CAChain})
}

func (s *Server) handleAuditPrune(w http.ResponseWriter, r *http.Request) {
	req, err := decodeBody[apiv1.AuditPruneRequest](w, r, apiv1.MaxBodyBytes)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.p.PruneAudit(r.Context(), req.Before, req.DryRun)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeJSON(w, http.StatusOK, apiv1.AuditPruneResponse{Through: res.Through, Deleted: res.Deleted, Anchor: res.Anchor, DryRun: res.DryRun})
}
