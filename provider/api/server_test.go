package api_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/api"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/test/logbuf"
)

// fake is an api.Provider with a real CA and scripted answers.
type fake struct {
	ca *ca.CA

	mu        sync.Mutex
	hosts     map[string]provider.Host // by ID
	revoked   map[string]bool
	tokens    map[string]bool // secret -> unused
	objects   []provider.Object
	policy    provider.Policy
	fail      error // returned by every domain call when set
	kdks      []provider.ReleasedKDK
	released  [][]byte                  // Bare slices handed out, to check wiping
	pending   string                    // SHA-256 of the last backup written
	confirmed bool                      // ConfirmBackup saw it
	admins    map[string]provider.Admin // by serial
	lastHost  string                    // serial of the last host certificate authorized
}

func newFake(t *testing.T) *fake {
	t.Helper()
	c, err := ca.New("test-provider", time.Now(), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &fake{ca: c, hosts: map[string]provider.Host{}, revoked: map[string]bool{}, tokens: map[string]bool{},
		admins: map[string]provider.Admin{}}
}

func (f *fake) err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail
}

func (f *fake) Status(ctx context.Context) (provider.Status, error) {
	if err := f.err(); err != nil {
		return provider.Status{}, err
	}
	return provider.Status{State: "Active", ProviderID: "p1", Hosts: len(f.hosts),
		KDKs: []provider.KDKVersion{{ID: "k1", Version: 1, Primary: true}}}, nil
}

func (f *fake) Backup(ctx context.Context, w io.Writer, pass []byte) (provider.BackupInfo, error) {
	if err := f.err(); err != nil {
		return provider.BackupInfo{}, err
	}
	_, err := fmt.Fprintf(w, "archive(%d)", len(pass))
	sum := sha256.Sum256([]byte(fmt.Sprintf("archive(%d)", len(pass))))
	f.mu.Lock()
	f.pending = hex.EncodeToString(sum[:])
	f.mu.Unlock()
	return provider.BackupInfo{ProviderID: "p1", SHA256: hex.EncodeToString(sum[:])}, err
}

func (f *fake) ConfirmBackup(ctx context.Context, sum string) (provider.BackupInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if sum != f.pending {
		return provider.BackupInfo{}, fmt.Errorf("backup %s: %w", sum, provider.ErrNotFound)
	}
	f.confirmed = true
	return provider.BackupInfo{ProviderID: "p1", SHA256: sum}, nil
}

func (f *fake) VerifyBackup(ctx context.Context, r io.Reader, pass []byte) (provider.BackupInfo, error) {
	data, _ := io.ReadAll(r)
	if string(pass) != "right" {
		return provider.BackupInfo{}, fmt.Errorf("archive of %d bytes: %w", len(data), provider.ErrBadPassphrase)
	}
	return provider.BackupInfo{ProviderID: "p1"}, nil
}

func (f *fake) CreateToken(ctx context.Context, ttl time.Duration) (provider.Token, error) {
	if err := f.err(); err != nil {
		return provider.Token{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	secret := fmt.Sprintf("secret-%d", len(f.tokens))
	f.tokens[secret] = true
	return provider.Token{ID: "t", Secret: secret, Expires: time.Now().Add(ttl)}, nil
}

func (f *fake) Enroll(ctx context.Context, req provider.EnrollRequest) (provider.EnrollResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	unused, ok := f.tokens[req.Token]
	switch {
	case !ok:
		return provider.EnrollResponse{}, fmt.Errorf("token: %w", provider.ErrTokenInvalid)
	case !unused:
		return provider.EnrollResponse{}, fmt.Errorf("token: %w", provider.ErrTokenUsed)
	}
	id := fmt.Sprintf("host-%d", len(f.hosts)+1)
	iss, err := f.ca.IssueHost(req.CSR, id, time.Now(), time.Hour)
	if err != nil {
		return provider.EnrollResponse{}, err
	}
	f.tokens[req.Token] = false
	f.hosts[id] = provider.Host{ID: id, Hostname: req.Hostname, EKPublic: req.EKPublic}
	return provider.EnrollResponse{HostID: id, Certificate: iss.DER, CAChain: [][]byte{f.ca.Certificate().Raw}}, nil
}

func (f *fake) CA(context.Context) (*x509.Certificate, error) { return f.ca.Certificate(), f.err() }
func (f *fake) CAHash(context.Context) (string, error)        { return f.ca.Hash(), f.err() }

func (f *fake) Hosts(ctx context.Context) ([]provider.Host, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Collect(maps.Values(f.hosts)), nil
}

func (f *fake) Revoke(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.hosts[id]; !ok {
		return fmt.Errorf("host %s: %w", id, provider.ErrHostUnknown)
	}
	f.revoked[id] = true
	return nil
}

func (f *fake) AuthorizeHost(ctx context.Context, cert *x509.Certificate) (provider.Host, error) {
	id, err := f.ca.Verify(cert, ca.RoleHost, time.Now())
	if err != nil {
		return provider.Host{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastHost = cert.SerialNumber.Text(16)
	h, ok := f.hosts[id]
	switch {
	case !ok:
		return provider.Host{}, fmt.Errorf("host %s: %w", id, provider.ErrHostUnknown)
	case f.revoked[id]:
		return provider.Host{}, fmt.Errorf("host %s was revoked: %w", id, provider.ErrHostRevoked)
	}
	return h, nil
}

func (f *fake) ReleaseTo(ctx context.Context, cert *x509.Certificate) (provider.Host, []provider.ReleasedKDK, string, error) {
	h, err := f.AuthorizeHost(ctx, cert)
	if err != nil {
		return provider.Host{}, nil, "", err
	}
	out, err := f.Release(ctx, h.ID)
	return h, out, f.keySet(), err
}

func (f *fake) CheckRelease(ctx context.Context, cert *x509.Certificate) (provider.Host, string, error) {
	h, err := f.AuthorizeHost(ctx, cert)
	if err != nil {
		return provider.Host{}, "", err
	}
	return h, f.keySet(), nil
}

// keySet names the fake's KDK versions.
func (f *fake) keySet() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for _, k := range f.kdks {
		ids = append(ids, k.ID)
	}
	return strings.Join(ids, ",")
}

func (f *fake) Release(ctx context.Context, id string) ([]provider.ReleasedKDK, error) {
	if err := f.err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []provider.ReleasedKDK
	for _, k := range f.kdks {
		if k.Bare != nil {
			k.Bare = bytes.Clone(k.Bare)
			f.released = append(f.released, k.Bare)
		}
		out = append(out, k)
	}
	return out, nil
}

func (f *fake) Rotate(ctx context.Context) (provider.KDKVersion, error) {
	return provider.KDKVersion{ID: "k2", Version: 2, Primary: true}, f.err()
}

func (f *fake) Retire(ctx context.Context, v int) error {
	if v == 1 {
		return fmt.Errorf("KDK version 1: 3 objects use it: %w", provider.ErrInUse)
	}
	return nil
}

func (f *fake) RegisterObject(ctx context.Context, hostID string, o provider.Object) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	o.HostID = hostID
	f.objects = append(f.objects, o)
	return nil
}

func (f *fake) UnregisterObject(ctx context.Context, hostID, vm, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, o := range f.objects {
		if o.VMUUID == vm && o.Name == name {
			f.objects = append(f.objects[:i], f.objects[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("%w: the catalog has no object %s for VM %s", provider.ErrNotFound, name, vm)
}

func (f *fake) ForgetVM(ctx context.Context, hostID, vm string) (provider.ForgetResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var res provider.ForgetResult
	var keep []provider.Object
	for _, o := range f.objects {
		switch {
		case o.VMUUID != vm:
			keep = append(keep, o)
		case o.HostID != hostID:
			keep = append(keep, o)
			res.Others = append(res.Others, o)
		default:
			res.Removed = append(res.Removed, o)
		}
	}
	f.objects = keep
	return res, nil
}

func (f *fake) ForgetObjects(ctx context.Context, vm, name string) ([]provider.Object, error) {
	return nil, fmt.Errorf("%w: the fake catalog forgets only through ForgetVM", provider.ErrNotFound)
}

func (f *fake) MoveVM(ctx context.Context, hostID, vm string) ([]provider.Object, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []provider.Object
	for i := range f.objects {
		if f.objects[i].VMUUID == vm {
			f.objects[i].HostID = hostID
			out = append(out, f.objects[i])
		}
	}
	if out == nil {
		return nil, fmt.Errorf("%w: the catalog holds no objects of VM %s", provider.ErrNotFound, vm)
	}
	return out, nil
}

func (f *fake) Objects(ctx context.Context, flt provider.ObjectFilter) ([]provider.Object, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []provider.Object
	for _, o := range f.objects {
		if flt.VMUUID == "" || flt.VMUUID == o.VMUUID {
			out = append(out, o)
		}
	}
	return out, nil
}

func (f *fake) Policy(ctx context.Context) (provider.Policy, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.policy, nil
}

func (f *fake) SetPolicy(ctx context.Context, p provider.Policy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.policy = p
	return nil
}

func (f *fake) AuditVerify(ctx context.Context) error {
	return &audit.VerifyError{Seq: 7, Reason: "hash mismatch"}
}

func (f *fake) Audit(ctx context.Context, n int) ([]audit.Record, error) {
	return []audit.Record{{Seq: 1, Kind: audit.KindInit, Actor: "provider"}}, nil
}

func (f *fake) IssueAdminCert(ctx context.Context, csr []byte) ([]byte, error) {
	c, err := ca.ParseCSR(csr)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", provider.ErrBadRequest, err)
	}
	iss, err := f.ca.IssueAdmin(csr, c.Subject.CommonName, time.Now(), time.Hour)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.admins[iss.Serial] = provider.Admin{Name: c.Subject.CommonName, Serial: iss.Serial, NotAfter: iss.Cert.NotAfter}
	return iss.DER, nil
}

func (f *fake) Admins(ctx context.Context) ([]provider.Admin, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Collect(maps.Values(f.admins)), nil
}

// RevokeAdmin revokes by serial only; "last" plays the last admin.
func (f *fake) RevokeAdmin(ctx context.Context, ref string) ([]provider.Admin, error) {
	if ref == "last" {
		return nil, fmt.Errorf("revoke admin %q: %w: issue another first", ref, provider.ErrLastAdmin)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.admins[ref]
	if !ok {
		return nil, fmt.Errorf("admin %q: %w", ref, provider.ErrNotFound)
	}
	a.Revoked = time.Now()
	f.admins[ref] = a
	return []provider.Admin{a}, nil
}

func (f *fake) AuthorizeAdmin(ctx context.Context, cert *x509.Certificate) error {
	if _, err := f.ca.Verify(cert, ca.RoleAdmin, time.Now()); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if a, ok := f.admins[cert.SerialNumber.Text(16)]; ok && !a.Revoked.IsZero() {
		return fmt.Errorf("admin certificate %q %w", a.Name, provider.ErrAdminRevoked)
	}
	return nil
}

func (f *fake) RenewHost(ctx context.Context, cert *x509.Certificate, csr []byte) (provider.EnrollResponse, error) {
	h, err := f.AuthorizeHost(ctx, cert)
	if err != nil {
		return provider.EnrollResponse{}, err
	}
	iss, err := f.ca.IssueHost(csr, h.ID, time.Now(), time.Hour)
	if err != nil {
		return provider.EnrollResponse{}, fmt.Errorf("%w: %w", provider.ErrBadRequest, err)
	}
	return provider.EnrollResponse{HostID: h.ID, Certificate: iss.DER, CAChain: [][]byte{f.ca.Certificate().Raw}}, nil
}

// PruneAudit prunes 3 records before 2026, refuses later times as the domain does.
func (f *fake) PruneAudit(ctx context.Context, before time.Time, dryRun bool) (provider.AuditPrune, error) {
	if before.Year() >= 2026 {
		return provider.AuditPrune{}, fmt.Errorf("audit prune: %w: record 9 and later are in no confirmed backup", provider.ErrNotBackedUp)
	}
	return provider.AuditPrune{Through: 3, Deleted: 3, Anchor: 9, DryRun: dryRun}, nil
}

// env is the API over the scripted fake, served with TLS, with an admin client.
type env struct {
	f *fake
	served
}

func certFrom(t *testing.T, c *ca.CA, role ca.Role, name string) tls.Certificate {
	t.Helper()
	key := newKey(t)
	var iss ca.Issued
	var err error
	switch role {
	case ca.RoleAdmin:
		iss, err = c.IssueAdmin(csrFor(t, key), name, time.Now(), time.Hour)
	case ca.RoleHost:
		iss, err = c.IssueHost(csrFor(t, key), name, time.Now(), time.Hour)
	case ca.RoleServer:
		iss, err = c.IssueServer(csrFor(t, key), []string{"127.0.0.1"}, time.Now(), time.Hour)
	}
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{iss.DER, c.Certificate().Raw}, PrivateKey: key, Leaf: iss.Cert}
}

func startEnv(t *testing.T) *env {
	t.Helper()
	f := newFake(t)
	logBuf := &logbuf.Buffer{}
	s, err := api.New(api.Config{Provider: f, Log: slog.New(slog.NewTextHandler(logBuf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv := serveTLS(t, s.Handler(), certFrom(t, f.ca, ca.RoleServer, ""))
	e := &env{f: f, served: served{srv: srv, api: s, caCert: f.ca.Certificate(), logBuf: logBuf}}
	e.admin = e.client(t, certFrom(t, f.ca, ca.RoleAdmin, "alice"))
	return e
}

func TestDomainErrorsTranslated(t *testing.T) {
	e := startEnv(t)
	host, _, _ := e.join(t, "kvm-03")
	tests := []struct {
		err      error
		wantCode string
		status   int
	}{
		{fmt.Errorf("release: %w: take a backup first (nkpctl provider backup)", provider.ErrNotBackedUp), apiv1.CodeNotBackedUp, 409},
		{fmt.Errorf("x: %w", provider.ErrTPMRequired), apiv1.CodeTPMRequired, 403},
		{fmt.Errorf("x: %w", provider.ErrNotInitialized), apiv1.CodeNotInitialized, 503},
		{fmt.Errorf("bolt: %w", store.ErrFull), apiv1.CodeUnavailable, 507},
		{fmt.Errorf("bolt: %w", store.ErrReadOnly), apiv1.CodeUnavailable, 503},
		{errors.New("something unexpected with key 0xdeadbeef"), apiv1.CodeInternal, 500},
	}
	for _, tc := range tests {
		t.Run(tc.wantCode, func(t *testing.T) {
			e.f.mu.Lock()
			e.f.fail = tc.err
			e.f.mu.Unlock()
			_, err := host.Release(context.Background())
			var ae *client.APIError
			if !errors.As(err, &ae) || ae.Code != tc.wantCode || ae.Status != tc.status {
				t.Fatalf("release with %v: %v, want %d %s", tc.err, err, tc.status, tc.wantCode)
			}
			if tc.status == 500 && strings.Contains(ae.Message, "deadbeef") {
				t.Fatalf("internal error detail leaked to the client: %q", ae.Message)
			}
			if tc.status != 500 && ae.Message != tc.err.Error() {
				t.Fatalf("message %q, want the domain's sentence %q", ae.Message, tc.err.Error())
			}
		})
	}
}

func TestRelease(t *testing.T) {
	e := startEnv(t)
	host, _, hostID := e.join(t, "kvm-04")
	bare := bytes.Repeat([]byte{0x42}, 32)
	e.f.kdks = []provider.ReleasedKDK{
		{ID: "k1", Version: 1, ImportBlob: []byte("blob-1")},
		{ID: "k2", Version: 2, Primary: true, Bare: bare},
	}
	ctx := context.Background()
	got, err := host.Release(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.KDKs) != 2 || string(got.KDKs[0].ImportBlob) != "blob-1" || !bytes.Equal(got.KDKs[1].Bare, bare) || !got.KDKs[1].Primary {
		t.Fatalf("released %+v", got.KDKs)
	}
	e.f.mu.Lock()
	for _, b := range e.f.released {
		if !bytes.Equal(b, make([]byte, len(b))) {
			t.Errorf("bare KDK buffer not wiped after the response: %x", b)
		}
	}
	e.f.mu.Unlock()
	if strings.Contains(e.logBuf.String(), "QkJCQkJC") || strings.Contains(e.logBuf.String(), "4242424242") {
		t.Fatal("KDK bytes in the log")
	}
	obj := apiv1.Object{VMUUID: "vm-1", Name: "vtpm", KeyID: "key-1", KDKID: "k2"}
	if err := host.RegisterObject(ctx, obj); err != nil {
		t.Fatal(err)
	}
	objs, err := e.admin.Objects(ctx, "vm-1", 0)
	if err != nil || len(objs) != 1 || objs[0].HostID != hostID || objs[0].KeyID != "key-1" {
		t.Fatalf("objects = %+v, %v", objs, err)
	}
	if err := host.UnregisterObject(ctx, "vm-1", "vtpm"); err != nil {
		t.Fatalf("unregister: %v", err)
	}
	if err := host.UnregisterObject(ctx, "vm-1", "vtpm"); !client.IsCode(err, apiv1.CodeNotFound) {
		t.Fatalf("unregister twice: %v, want %s", err, apiv1.CodeNotFound)
	}
	if objs, err := e.admin.Objects(ctx, "vm-1", 0); err != nil || len(objs) != 0 {
		t.Fatalf("objects after unregister = %+v, %v", objs, err)
	}
}

func TestAdminCalls(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	var buf bytes.Buffer
	if _, err := e.admin.Backup(ctx, &buf, []byte("pass")); err != nil || buf.String() != "archive(4)" {
		t.Fatalf("backup = %q, %v", buf.String(), err)
	}
	if _, err := e.admin.ConfirmBackup(ctx, strings.Repeat("0", 64)); !client.IsCode(err, apiv1.CodeNotFound) {
		t.Fatalf("confirming an unknown archive: %v, want %s", err, apiv1.CodeNotFound)
	}
	sum := sha256.Sum256(buf.Bytes())
	info, err := e.admin.ConfirmBackup(ctx, hex.EncodeToString(sum[:]))
	e.f.mu.Lock()
	confirmed := e.f.confirmed
	e.f.mu.Unlock()
	if err != nil || info.SHA256 != hex.EncodeToString(sum[:]) || !confirmed {
		t.Fatalf("confirm = %+v, %v (reached the domain: %v)", info, err, confirmed)
	}
	if _, err := e.admin.VerifyBackup(ctx, buf.Bytes(), []byte("wrong")); !client.IsCode(err, apiv1.CodeBadPassphrase) {
		t.Fatalf("verify with the wrong passphrase: %v", err)
	}
	if _, err := e.admin.VerifyBackup(ctx, buf.Bytes(), []byte("right")); err != nil {
		t.Fatalf("verify: %v", err)
	}
	if err := e.admin.Retire(ctx, 1); !client.IsCode(err, apiv1.CodeInUse) {
		t.Fatalf("retire in use: %v", err)
	}
	if err := e.admin.Retire(ctx, 2); err != nil {
		t.Fatalf("retire: %v", err)
	}
	if v, err := e.admin.Rotate(ctx); err != nil || v.Version != 2 {
		t.Fatalf("rotate = %+v, %v", v, err)
	}
	if p, err := e.admin.SetPolicy(ctx, apiv1.Policy{TPMRequired: true}); err != nil || !p.TPMRequired {
		t.Fatalf("set policy = %+v, %v", p, err)
	}
	if err := e.admin.AuditVerify(ctx); !client.IsCode(err, apiv1.CodeAuditBroken) || !strings.Contains(err.Error(), "record 7") {
		t.Fatalf("audit verify: %v, want %s naming record 7", err, apiv1.CodeAuditBroken)
	}
	if recs, err := e.admin.Audit(ctx, 5); err != nil || len(recs) != 1 || recs[0].Kind != "init" {
		t.Fatalf("audit = %+v, %v", recs, err)
	}
	st, err := e.admin.Status(ctx)
	if err != nil || st.ProviderID != "p1" || st.CAHash != e.f.ca.Hash() {
		t.Fatalf("status = %+v, %v", st, err)
	}
}

// TestAdminRevocation: an admin issued through the API works until revoked, then is
// refused at once (same kept-alive connection) with code admin_revoked; the admin who
// revoked it keeps working; the domain's last-admin refusal becomes 409 last_admin.
func TestAdminRevocation(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	bobCert, err := e.admin.AddAdmin(ctx, "bob", newKey(t))
	if err != nil {
		t.Fatalf("add admin: %v", err)
	}
	if bobCert.Leaf.Subject.CommonName != "bob" || ca.RoleOf(bobCert.Leaf) != ca.RoleAdmin {
		t.Fatalf("issued %q role %q, want bob %s", bobCert.Leaf.Subject.CommonName, ca.RoleOf(bobCert.Leaf), ca.RoleAdmin)
	}
	bob := e.client(t, bobCert)
	if _, err := bob.Status(ctx); err != nil {
		t.Fatalf("new admin before revocation: %v", err)
	}
	list, err := e.admin.Admins(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "bob" || list[0].Revoked {
		t.Fatalf("admins = %+v, %v", list, err)
	}
	serial := bobCert.Leaf.SerialNumber.Text(16)
	got, err := e.admin.RevokeAdmin(ctx, serial)
	if err != nil || len(got) != 1 || !got[0].Revoked || got[0].Serial != serial {
		t.Fatalf("revoke = %+v, %v", got, err)
	}
	_, err = bob.Status(ctx)
	var ae *client.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusForbidden || ae.Code != apiv1.CodeAdminRevoked || !strings.Contains(ae.Message, "bob") {
		t.Fatalf("revoked admin: %v, want 403 %s naming bob", err, apiv1.CodeAdminRevoked)
	}
	if _, err := e.admin.Status(ctx); err != nil {
		t.Fatalf("the other admin after the revocation: %v", err)
	}
	if _, err := e.admin.RevokeAdmin(ctx, "last"); !client.IsCode(err, apiv1.CodeLastAdmin) {
		t.Fatalf("revoking the last admin: %v, want %s", err, apiv1.CodeLastAdmin)
	}
	if _, err := e.admin.RevokeAdmin(ctx, "nobody"); !client.IsCode(err, apiv1.CodeNotFound) {
		t.Fatalf("revoking an unknown admin: %v, want %s", err, apiv1.CodeNotFound)
	}
}

// TestRenew: a host renews through the client, which then presents the new certificate;
// a revoked host, an admin certificate and a request without one are refused.
func TestRenew(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	host, _, id := e.join(t, "kvm-renew")
	newKey := newKey(t)
	cert, err := host.Renew(ctx, newKey)
	if err != nil {
		t.Fatalf("renew: %v", err)
	}
	if cert.Leaf.Subject.CommonName != id || !newKey.PublicKey.Equal(cert.Leaf.PublicKey) {
		t.Fatalf("renewed certificate for %q, want host %s and the new key", cert.Leaf.Subject.CommonName, id)
	}
	if _, err := host.Release(ctx); err != nil {
		t.Fatalf("release with the renewed certificate: %v", err)
	}
	tests := []struct {
		name     string
		certs    []tls.Certificate
		wantCode int
		want     string
	}{
		{"no certificate", nil, 401, apiv1.CodeUnauthenticated},
		{"admin certificate", []tls.Certificate{certFrom(t, e.f.ca, ca.RoleAdmin, "alice")}, 403, apiv1.CodeForbidden},
		{"unknown host", []tls.Certificate{certFrom(t, e.f.ca, ca.RoleHost, "ghost")}, 403, apiv1.CodeHostUnknown},
		{"empty body", []tls.Certificate{cert}, 400, apiv1.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, eb, _ := e.do(t, e.rawClient(tc.certs...), "POST", apiv1.PathHostRenew, "{}")
			if code != tc.wantCode || eb.Code != tc.want {
				t.Fatalf("renew = %d %q (%s), want %d %q", code, eb.Code, eb.Error, tc.wantCode, tc.want)
			}
		})
	}
	if err := e.admin.Revoke(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := host.Renew(ctx, newKey); !client.IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("renew of a revoked host: %v, want %s", err, apiv1.CodeHostRevoked)
	}
}

func TestAuditPrune(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	got, err := e.admin.PruneAudit(ctx, time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC), true)
	if err != nil || got != (apiv1.AuditPruneResponse{Through: 3, Deleted: 3, Anchor: 9, DryRun: true}) {
		t.Fatalf("prune = %+v, %v", got, err)
	}
	if _, err := e.admin.PruneAudit(ctx, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), false); !client.IsCode(err, apiv1.CodeNotBackedUp) {
		t.Fatalf("prune past the backup: %v, want %s", err, apiv1.CodeNotBackedUp)
	}
	code, eb, _ := e.do(t, e.rawClient(certFrom(t, e.f.ca, ca.RoleAdmin, "alice")), "POST", apiv1.PathAuditPrune, `{"dry_run":true}`)
	if code != http.StatusBadRequest || eb.Code != apiv1.CodeBadRequest || !strings.Contains(eb.Error, "before") {
		t.Fatalf("prune without a time = %d %+v, want 400 naming \"before\"", code, eb)
	}
}

// TestRenewWhileReleasing: requests in flight on the same Client while it renews all
// succeed (the Client swaps its connection pool, it does not cut requests).
func TestRenewWhileReleasing(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	host, _, _ := e.join(t, "kvm-busy")
	var wg sync.WaitGroup
	errs := make(chan error, 4*20)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				if _, err := host.Release(ctx); err != nil {
					errs <- err
				}
			}
		}()
	}
	cert, err := host.Renew(ctx, newKey(t))
	wg.Wait()
	close(errs)
	if err != nil {
		t.Fatalf("renew: %v", err)
	}
	for err := range errs {
		t.Fatalf("release during the renewal: %v", err)
	}
	if _, err := host.Release(ctx); err != nil {
		t.Fatalf("release after the renewal: %v", err)
	}
	e.f.mu.Lock()
	last := e.f.lastHost
	e.f.mu.Unlock()
	if want := cert.Leaf.SerialNumber.Text(16); last != want {
		t.Fatalf("after the renewal the client presented serial %s, want the new %s", last, want)
	}
}
