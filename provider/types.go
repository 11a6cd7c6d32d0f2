package provider

import (
	"fmt"
	"time"
)

// State is the provider's lifecycle state.
type State string

// States.
const (
	// StateNotBackedUp: some live KDK version is in no backup; releases are refused.
	StateNotBackedUp State = "NotBackedUp"
	// StateActive: every live KDK version is in a backup; releases are allowed.
	StateActive State = "Active"
)

// Policy is the provider's policy.
type Policy struct {
	// TPMRequired refuses hosts without a TPM endorsement key: at enrollment, and at
	// release for hosts enrolled before the policy was turned on.
	TPMRequired bool
}

// InitOptions configure Init.
type InitOptions struct {
	Policy Policy
}

// KDKVersion describes one KDK version, without its key.
type KDKVersion struct {
	ID       string // UUID
	Version  int    // 1, 2, ...
	Primary  bool
	Created  time.Time
	Retired  time.Time // zero while live
	BackedUp bool      // included in a backup
}

// Status summarises the provider.
type Status struct {
	State      State
	ProviderID string
	Created    time.Time
	KDKs       []KDKVersion // in version order, retired ones included
	Hosts      int          // enrolled and not revoked
	Revoked    int          // revoked hosts
	LastBackup time.Time    // zero before the first confirmed backup
	Policy     Policy
	// PendingBackups counts backups written but not confirmed (ConfirmBackup) within
	// PendingBackupTTL: they do not count as backups.
	PendingBackups int
}

// Primary returns the primary KDK version (zero value if none).
func (s Status) Primary() KDKVersion {
	for _, k := range s.KDKs {
		if k.Primary {
			return k
		}
	}
	return KDKVersion{}
}

// BackupInfo describes a backup archive without its secrets.
type BackupInfo struct {
	ProviderID string
	Created    time.Time
	KDKs       []int // live KDK versions in the archive
	Primary    int
	Hosts      int
	Objects    int
	Bytes      int64 // size of the encrypted archive
	// SHA256 is the hex SHA-256 of the encrypted archive, as `sha256sum` prints it; the
	// audit log records it, so an archive file can be matched to its backup.
	SHA256 string
}

// Token is a single-use join token. Secret is shown once; it is what the host presents
// (it embeds the ID: "<id>.<random>"). The provider keeps only a hash of it.
type Token struct {
	ID      string
	Secret  string
	Expires time.Time
}

// EnrollRequest is what a joining host sends.
type EnrollRequest struct {
	Token    string // Token.Secret
	CSR      []byte // DER certificate request for the host's own key
	Hostname string
	// EKPublic is the host TPM's endorsement key, as TPM2B_PUBLIC (or TPMT_PUBLIC) bytes
	// or PKIX DER; empty for a host without a TPM. It must be a key of the default EK
	// templates (RSA 2048 or ECC NIST P-256), which is what go-tpm-tools'
	// client.EndorsementKeyRSA/ECC load and what server.CreateImportBlob wraps for.
	EKPublic []byte
}

// EnrollResponse is the enrolled host's identity.
type EnrollResponse struct {
	HostID      string
	Certificate []byte   // DER, role nkp-host, CN = HostID
	CAChain     [][]byte // DER, the provider CA
}

// Host is an enrolled host.
type Host struct {
	ID           string
	Hostname     string
	Enrolled     time.Time
	CertSerial   string // hex serial of its current certificate
	CertNotAfter time.Time
	EKPublic     []byte    // PKIX DER; empty for hosts without a TPM
	Revoked      time.Time // zero unless revoked
}

// TPM reports whether the host enrolled with a TPM endorsement key.
func (h Host) TPM() bool { return len(h.EKPublic) > 0 }

// ReleasedKDK is one KDK version released to a host: exactly one of ImportBlob and Bare is
// set. The caller wipes Bare after use (Wipe).
type ReleasedKDK struct {
	ID      string
	Version int
	Primary bool
	// ImportBlob is a go-tpm-tools pb.ImportBlob (proto-marshalled) from
	// server.CreateImportBlob for the host's EK: the host unwraps it with
	// client.EndorsementKeyRSA/ECC(rw).Import(blob).
	ImportBlob []byte
	// Bare is the 32-byte KDK itself, for hosts without a TPM while tpm-required is off.
	Bare []byte
}

// Wipe zeroes the bare key.
func (k *ReleasedKDK) Wipe() { clear(k.Bare) }

// Object names a protected object in the catalog.
type Object struct {
	VMUUID     string
	Name       string // "vtpm" or "disk:<target>", e.g. "disk:vda"
	KeyID      string // UUID
	KDKID      string // UUID of the KDK version its key derives from
	KDKVersion int    // filled in by the provider
	HostID     string // the host that registered it; filled in by the provider
	Registered time.Time
}

// ObjectFilter selects objects; zero fields match everything.
type ObjectFilter struct {
	VMUUID     string
	KDKVersion int
}

func (f ObjectFilter) match(o Object) bool {
	return (f.VMUUID == "" || f.VMUUID == o.VMUUID) && (f.KDKVersion == 0 || f.KDKVersion == o.KDKVersion)
}

// String names the object for messages (no key material: IDs only).
func (o Object) String() string {
	return fmt.Sprintf("VM %s %s (key %s, KDK v%d)", o.VMUUID, o.Name, o.KeyID, o.KDKVersion)
}

// Admin is an issued administrator certificate (role nkp-admin).
type Admin struct {
	Name     string // the certificate's CN ("" for a serial revoked without a record)
	Serial   string // hex serial
	Issued   time.Time
	NotAfter time.Time
	Revoked  time.Time // zero unless revoked
}
