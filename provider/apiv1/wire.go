package apiv1

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// Body size limits: every request body is read through http.MaxBytesReader with one of
// these, and the decoders below refuse anything longer.
const (
	// MaxBodyBytes bounds ordinary JSON bodies (enrollment with CSR and EK, objects,
	// tokens, policy, backup passphrases).
	MaxBodyBytes = 64 << 10
	// MaxArchiveBodyBytes bounds bodies carrying a backup archive (verify, restore).
	MaxArchiveBodyBytes = 64 << 20
)

// ErrBadRequest marks a body that is not one well-formed JSON value of the expected
// type: malformed, unknown fields, trailing data, missing required fields or too long.
var ErrBadRequest = errors.New("bad request body")

// ErrTooLong marks a body longer than the limit given to Decode (whose error wraps both
// it and ErrBadRequest).
var ErrTooLong = errors.New("body too long")

// ErrorBody is every error response: a sentence for people and a stable code for programs.
type ErrorBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// EnrollRequest is POST /v1/enroll: a host presents its join token, a PKCS#10 CSR (DER)
// for its own key and, optionally, its TPM endorsement key's public part.
type EnrollRequest struct {
	Token    string `json:"token"`
	CSR      []byte `json:"csr"`
	Hostname string `json:"hostname"`
	EKPublic []byte `json:"ek_public,omitempty"`
}

// EnrollResponse carries the host's certificate (DER) and the CA chain to verify the
// provider with.
type EnrollResponse struct {
	HostID      string   `json:"host_id"`
	Certificate []byte   `json:"certificate"`
	CAChain     [][]byte `json:"ca_chain"`
}

// KDK is one released key derivation key version: exactly one of ImportBlob (a
// go-tpm-tools ImportBlob, proto-marshalled, only the host's TPM unwraps it) and Bare
// (the 32 raw bytes, for hosts without a TPM while tpm-required is off) is set.
type KDK struct {
	ID         string `json:"id"`
	Version    int    `json:"version"`
	Primary    bool   `json:"primary"`
	ImportBlob []byte `json:"import_blob,omitempty"`
	Bare       []byte `json:"bare,omitempty"`
}

// ReleaseResponse is GET /v1/host/kdks: every KDK version still in use, and their key
// set. GET /v1/host/kdks?known=KEYSET, with the key set of the host's last release,
// answers Unchanged and no KDKs while that set is still current: the host is checked
// (revoked, unknown and not-backed-up refusals as usual) but no key leaves, so nothing is
// audited. A host polls that way and fetches keys only when the set changed.
type ReleaseResponse struct {
	ProviderID string `json:"provider_id,omitempty"`
	KDKs       []KDK  `json:"kdks"`
	// KeySet names the provider and its live KDK versions (opaque, 32 hex digits).
	KeySet string `json:"key_set,omitempty"`
	// Unchanged: the request's known key set is current; KDKs is empty.
	Unchanged bool `json:"unchanged,omitempty"`
}

// Object is one protected object in the catalog (POST /v1/host/objects, GET /v1/admin/objects).
type Object struct {
	VMUUID     string    `json:"vm_uuid"`
	Name       string    `json:"name"`
	KeyID      string    `json:"key_id"`
	KDKID      string    `json:"kdk_id"`
	KDKVersion int       `json:"kdk_version,omitempty"`
	HostID     string    `json:"host_id,omitempty"`
	Registered time.Time `json:"registered,omitzero"`
}

// MoveRequest is POST /v1/host/moves: the calling host takes over the catalog objects of
// VM VMUUID (after the VM migrated to it).
type MoveRequest struct {
	VMUUID string `json:"vm_uuid"`
}

// ForgetResponse is DELETE /v1/host/objects/{vm}: the calling host's objects of the VM
// that were removed, and the VM's objects that another host owns, left alone (the VM
// migrated there, or was protected there).
type ForgetResponse struct {
	Removed []Object `json:"removed"`
	Others  []Object `json:"others,omitempty"`
}

// ForgetRequest is POST /v1/admin/objects/forget: remove VM VMUUID's catalog objects
// (only object Name if set) that a revoked or no longer enrolled host registered.
type ForgetRequest struct {
	VMUUID string `json:"vm_uuid"`
	Name   string `json:"name,omitempty"`
}

// ObjectsResponse lists catalog entries.
type ObjectsResponse struct {
	Objects []Object `json:"objects"`
}

// KDKVersion describes one KDK version without its key.
type KDKVersion struct {
	ID      string    `json:"id"`
	Version int       `json:"version"`
	Primary bool      `json:"primary"`
	Created time.Time `json:"created"`
	Retired bool      `json:"retired,omitempty"`
}

// Status is GET /v1/admin/status.
type Status struct {
	State       string       `json:"state"`
	ProviderID  string       `json:"provider_id"`
	KDKs        []KDKVersion `json:"kdks"`
	Hosts       int          `json:"hosts"`
	LastBackup  time.Time    `json:"last_backup,omitzero"`
	TPMRequired bool         `json:"tpm_required"`
	CAHash      string       `json:"ca_hash"`
	// PendingBackups counts backups written but not confirmed: they do not count.
	PendingBackups int `json:"pending_backups,omitempty"`
}

// TokenRequest is POST /v1/admin/tokens. TTLSeconds 0 means the provider's default.
type TokenRequest struct {
	TTLSeconds int64 `json:"ttl_seconds"`
}

// Token is a join token: Secret is shown once and is what a host presents.
type Token struct {
	ID      string    `json:"id"`
	Secret  string    `json:"secret"`
	Expires time.Time `json:"expires"`
	CAHash  string    `json:"ca_hash"`
}

// Host is one enrolled host.
type Host struct {
	ID       string    `json:"id"`
	Hostname string    `json:"hostname"`
	TPM      bool      `json:"tpm"`
	Enrolled time.Time `json:"enrolled,omitzero"`
	Revoked  bool      `json:"revoked"`
	// CertNotAfter is when the host's current certificate expires (it renews it with POST
	// /v1/host/renew).
	CertNotAfter time.Time `json:"cert_not_after,omitzero"`
}

// HostsResponse is GET /v1/admin/hosts.
type HostsResponse struct {
	Hosts []Host `json:"hosts"`
}

// BackupRequest is POST /v1/admin/backup; the archive is the response body.
type BackupRequest struct {
	Passphrase []byte `json:"passphrase"`
}

// HeaderArchiveSHA256 carries the hex SHA-256 of the archive in the response to POST
// /v1/admin/backup; the client checks the bytes it stored against it.
const HeaderArchiveSHA256 = "Nkp-Archive-Sha256"

// BackupConfirmRequest is POST /v1/admin/backup/confirm: the hex SHA-256 of an archive
// the admin stored durably and opened again with its passphrase. Until it is posted, the
// backup does not count (the provider stays NotBackedUp).
type BackupConfirmRequest struct {
	SHA256 string `json:"sha256"`
}

// ArchiveRequest is POST /v1/admin/backup/verify and POST /v1/admin/restore.
type ArchiveRequest struct {
	Passphrase []byte `json:"passphrase"`
	Archive    []byte `json:"archive"`
	Force      bool   `json:"force,omitempty"`
}

// BackupInfo describes an archive.
type BackupInfo struct {
	ProviderID  string    `json:"provider_id"`
	Created     time.Time `json:"created"`
	KDKVersions int       `json:"kdk_versions"`
	Hosts       int       `json:"hosts"`
	Objects     int       `json:"objects"`
	SHA256      string    `json:"sha256,omitempty"`
}

// Policy is GET/PUT /v1/admin/policy.
type Policy struct {
	TPMRequired bool `json:"tpm_required"`
}

// AuditRecord is one audit log entry; it never carries key material.
type AuditRecord struct {
	Seq     uint64            `json:"seq"`
	Time    time.Time         `json:"time"`
	Kind    string            `json:"kind"`
	Actor   string            `json:"actor"`
	Subject string            `json:"subject"`
	Details map[string]string `json:"details,omitempty"`
	Hash    string            `json:"hash,omitempty"`
}

// AuditResponse is GET /v1/admin/audit.
type AuditResponse struct {
	Records []AuditRecord `json:"records"`
}

// AuditPruneRequest is POST /v1/admin/audit/prune: delete the audit records dated
// before Before (required); DryRun only reports what would go.
type AuditPruneRequest struct {
	Before time.Time `json:"before"`
	DryRun bool      `json:"dry_run,omitempty"`
}

// AuditPruneResponse says which records went (or would go, DryRun): 1 to Through
// (Deleted of them; Through 0 = none). Anchor is the audit record the newest confirmed
// backup recorded: it and every later record are kept.
type AuditPruneResponse struct {
	Through uint64 `json:"through"`
	Deleted int    `json:"deleted"`
	Anchor  uint64 `json:"anchor"`
	DryRun  bool   `json:"dry_run,omitempty"`
}

// HostRenewRequest is POST /v1/host/renew: a PKCS#10 CSR (DER) for the host's current
// key or a new one; the answer is an EnrollResponse with the same host ID.
type HostRenewRequest struct {
	CSR []byte `json:"csr"`
}

// Admin is one administrator certificate (GET /v1/admin/admins).
type Admin struct {
	Name      string    `json:"name"`
	Serial    string    `json:"serial"`
	Issued    time.Time `json:"issued,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	Revoked   bool      `json:"revoked"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// AdminsResponse lists administrator certificates.
type AdminsResponse struct {
	Admins []Admin `json:"admins"`
}

// AdminCertRequest is POST /v1/admin/admins: a PKCS#10 CSR (DER) whose CN names the new
// administrator.
type AdminCertRequest struct {
	CSR []byte `json:"csr"`
}

// AdminCertResponse carries the new administrator certificate (DER) and the CA chain.
type AdminCertResponse struct {
	Certificate []byte   `json:"certificate"`
	CAChain     [][]byte `json:"ca_chain"`
}

// AdminRevokeRequest is POST /v1/admin/admins/revoke: Admin is a certificate serial (hex)
// or an admin name (every live certificate of that name).
type AdminRevokeRequest struct {
	Admin string `json:"admin"`
}

// Decode reads exactly one JSON value of type T from r, refusing unknown fields, trailing
// data and bodies longer than limit. Errors wrap ErrBadRequest.
func Decode[T any](r io.Reader, limit int64) (T, error) {
	var v T
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return v, fmt.Errorf("%w: reading body: %w", ErrBadRequest, err)
	}
	if int64(len(data)) > limit {
		return v, fmt.Errorf("%w: %w (limit %d bytes)", ErrBadRequest, ErrTooLong, limit)
	}
	defer clear(data) // bodies may carry passphrases
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return v, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	if dec.More() {
		return v, fmt.Errorf("%w: data after the JSON value", ErrBadRequest)
	}
	if _, err := dec.Token(); err != io.EOF {
		return v, fmt.Errorf("%w: data after the JSON value", ErrBadRequest)
	}
	if c, ok := any(&v).(interface{ check() error }); ok {
		if err := c.check(); err != nil {
			return v, fmt.Errorf("%w: %v", ErrBadRequest, err)
		}
	}
	return v, nil
}

func (r *EnrollRequest) check() error {
	switch {
	case r.Token == "":
		return errors.New(`"token" is required`)
	case len(r.CSR) == 0:
		return errors.New(`"csr" (a DER PKCS#10 request) is required`)
	case r.Hostname == "" || len(r.Hostname) > 253:
		return errors.New(`"hostname" is required (at most 253 characters)`)
	}
	return nil
}

func (o *Object) check() error {
	switch {
	case o.VMUUID == "":
		return errors.New(`"vm_uuid" is required`)
	case o.Name == "":
		return errors.New(`"name" is required ("disk:<target>" or "vtpm")`)
	case o.KeyID == "":
		return errors.New(`"key_id" is required`)
	case o.KDKID == "":
		return errors.New(`"kdk_id" is required`)
	}
	return nil
}

func (m *MoveRequest) check() error {
	if m.VMUUID == "" {
		return errors.New(`"vm_uuid" is required`)
	}
	return nil
}

func (f *ForgetRequest) check() error {
	switch {
	case f.VMUUID == "":
		return errors.New(`"vm_uuid" is required`)
	case len(f.VMUUID) > 64:
		return errors.New(`"vm_uuid" is a UUID (36 characters)`)
	case len(f.Name) > 64:
		return errors.New(`"name" is "vtpm" or "disk:<target>" (at most 64 characters)`)
	}
	return nil
}

func (t *TokenRequest) check() error {
	if t.TTLSeconds < 0 {
		return errors.New(`"ttl_seconds" must not be negative`)
	}
	return nil
}

func (b *BackupRequest) check() error {
	if len(b.Passphrase) == 0 {
		return errors.New(`"passphrase" is required`)
	}
	return nil
}

func (b *BackupConfirmRequest) check() error {
	if b.SHA256 == "" {
		return errors.New(`"sha256" is required (hex SHA-256 of the stored archive)`)
	}
	return nil
}

func (a *ArchiveRequest) check() error {
	switch {
	case len(a.Passphrase) == 0:
		return errors.New(`"passphrase" is required`)
	case len(a.Archive) == 0:
		return errors.New(`"archive" is required`)
	}
	return nil
}

func (a *AdminCertRequest) check() error {
	if len(a.CSR) == 0 {
		return errors.New(`"csr" (a DER PKCS#10 request whose CN names the admin) is required`)
	}
	return nil
}

func (a *AdminRevokeRequest) check() error {
	if a.Admin == "" || len(a.Admin) > 253 {
		return errors.New(`"admin" is required: an admin name or a certificate serial (at most 253 characters)`)
	}
	return nil
}

func (h *HostRenewRequest) check() error {
	if len(h.CSR) == 0 {
		return errors.New(`"csr" (a DER PKCS#10 request for the host's key) is required`)
	}
	return nil
}

func (a *AuditPruneRequest) check() error {
	if a.Before.IsZero() {
		return errors.New(`"before" (RFC 3339 time) is required`)
	}
	return nil
}
