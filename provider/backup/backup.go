// Package backup reads and writes the provider's backup archive: a versioned JSON document
// holding everything needed to rebuild a provider, encrypted with age to a passphrase
// (scrypt recipient). Only package provider imports it.
//
// # Break-glass
//
// The archive is a plain binary age file, so the standard tool opens it without nkp:
//
//	age -d -o provider-backup.json provider-backup.age   # asks for the passphrase on the terminal
//
// The output is the JSON document below; the KDKs are in "kdks[].key" (base64 of 32 bytes),
// which is all a host needs to derive its VM keys (see DESIGN.md, key hierarchy:
// HKDF-SHA256(KDK, info = "nkp/v1/" purpose "/" vm-uuid "/" key-id)). Keep the
// decrypted file off shared disks and delete it when done.
//
// # Schema (format "nkp-provider-backup", version 1)
//
//	{
//	  "format": "nkp-provider-backup",          // always this string
//	  "version": 1,                             // bumped on any incompatible change
//	  "created": "2026-11-28T08:00:00Z",        // when the backup was taken (RFC 3339)
//	  "provider_id": "<uuid>",
//	  "provider_created": "<RFC 3339>",
//	  "policy": {"tpm_required": false},
//	  "kdks": [{                                // every KDK version, retired ones included
//	    "id": "<uuid>", "version": 1, "created": "<RFC 3339>",
//	    "primary": true,                        // exactly one live version is primary
//	    "retired": "<RFC 3339>",                // omitted while live
//	    "key": "<base64, 32 bytes>"             // omitted once retired (the key is destroyed)
//	  }],
//	  "ca": {"cert": "<base64 DER>", "key": "<base64 PKCS#8 DER, ECDSA P-256>"},
//	  "hosts": [{
//	    "id": "<uuid>", "hostname": "kvm-01", "enrolled": "<RFC 3339>",
//	    "cert_serial": "<hex>", "cert_not_after": "<RFC 3339>",
//	    "ek_public": "<base64 PKIX DER>",        // omitted for hosts without a TPM
//	    "revoked": "<RFC 3339>"                  // omitted unless revoked
//	  }],
//	  "objects": [{                             // the key catalog
//	    "vm_uuid": "<uuid>", "name": "disk:vda" | "vtpm", "key_id": "<uuid>",
//	    "kdk_id": "<uuid>", "kdk_version": 1, "host_id": "<uuid>", "registered": "<RFC 3339>"
//	  }],
//	  "admins": [{                              // administrator certificates (role nkp-admin); optional
//	    "name": "alice", "serial": "<hex>",     // name is "" for a serial revoked without a record
//	    "issued": "<RFC 3339>", "not_after": "<RFC 3339>",
//	    "revoked": "<RFC 3339>"                  // omitted unless revoked
//	  }],
//	  "audit_head": {"seq": 42, "hash": "<hex>"} // the audit chain's last record when taken; optional
//	}
//
// Unknown fields are refused: a reader of version 1 must not silently drop data that a
// later writer put in the archive. "admins" was added within version 1 (optional, so
// archives written before it still read and restore; an nkp older than it refuses an
// archive that has it, naming the field, rather than dropping the revocations).
package backup

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"

	"filippo.io/age"
	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/ca"
)

// Format and Version identify the document inside the archive.
const (
	Format  = "nkp-provider-backup"
	Version = 1
)

// Limits and defaults.
const (
	// MaxPlaintext bounds the decrypted document a reader accepts.
	MaxPlaintext = 64 << 20
	// DefaultWorkFactor is age's own scrypt default (log2 N), about a second and 256 MiB
	// per guess here: every archive is written with it.
	DefaultWorkFactor = 18
	// MaxWorkFactor is the highest scrypt work factor a reader accepts (age's own limit).
	MaxWorkFactor = 22
	// KeySize is the length of a KDK.
	KeySize = 32
)

// Errors, checked with errors.Is.
var (
	// ErrBadPassphrase: the passphrase does not open the archive (or the archive was not
	// encrypted to a passphrase).
	ErrBadPassphrase = errors.New("wrong backup passphrase")
	// ErrBadArchive: the archive is truncated, altered, not an age file, or the document
	// inside is not a valid nkp provider backup.
	ErrBadArchive = errors.New("bad backup archive")
)

// Document is the plaintext inside the archive. See the package comment for its JSON.
type Document struct {
	Format          string     `json:"format"`
	Version         int        `json:"version"`
	Created         time.Time  `json:"created"`
	ProviderID      string     `json:"provider_id"`
	ProviderCreated time.Time  `json:"provider_created"`
	Policy          Policy     `json:"policy"`
	KDKs            []KDK      `json:"kdks"`
	CA              CA         `json:"ca"`
	Hosts           []Host     `json:"hosts"`
	Objects         []Object   `json:"objects"`
	Admins          []Admin    `json:"admins,omitempty"`
	AuditHead       *AuditHead `json:"audit_head,omitempty"`
}

// Admin is one administrator certificate the provider issued (or a revoked serial).
type Admin struct {
	Name     string     `json:"name"`
	Serial   string     `json:"serial"`
	Issued   time.Time  `json:"issued,omitzero"`
	NotAfter time.Time  `json:"not_after,omitzero"`
	Revoked  *time.Time `json:"revoked,omitempty"`
}

// Policy is the provider's policy.
type Policy struct {
	TPMRequired bool `json:"tpm_required"`
}

// KDK is one key derivation key version.
type KDK struct {
	ID      string     `json:"id"`
	Version int        `json:"version"`
	Created time.Time  `json:"created"`
	Primary bool       `json:"primary"`
	Retired *time.Time `json:"retired,omitempty"`
	Key     []byte     `json:"key,omitempty"`
}

// CA is the provider's certificate authority.
type CA struct {
	Cert []byte `json:"cert"`
	Key  []byte `json:"key"`
}

// Host is one enrolled host.
type Host struct {
	ID           string     `json:"id"`
	Hostname     string     `json:"hostname"`
	Enrolled     time.Time  `json:"enrolled"`
	CertSerial   string     `json:"cert_serial"`
	CertNotAfter time.Time  `json:"cert_not_after"`
	EKPublic     []byte     `json:"ek_public,omitempty"`
	Revoked      *time.Time `json:"revoked,omitempty"`
}

// Object is one catalog entry.
type Object struct {
	VMUUID     string    `json:"vm_uuid"`
	Name       string    `json:"name"`
	KeyID      string    `json:"key_id"`
	KDKID      string    `json:"kdk_id"`
	KDKVersion int       `json:"kdk_version"`
	HostID     string    `json:"host_id"`
	Registered time.Time `json:"registered"`
}

// AuditHead names the last audit record when the backup was taken.
type AuditHead struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// Info summarises an archive without its secrets.
type Info struct {
	ProviderID  string
	Created     time.Time
	KDKVersions []int // live (not retired) versions
	Primary     int
	Hosts       int
	Objects     int
	Bytes       int64 // size of the encrypted archive (Write and Read)
}

// Wipe zeroes the key material in the document.
func (d *Document) Wipe() {
	for i := range d.KDKs {
		clear(d.KDKs[i].Key)
	}
	clear(d.CA.Key)
}

// Info summarises the document.
func (d *Document) Info() Info {
	in := Info{ProviderID: d.ProviderID, Created: d.Created, Hosts: len(d.Hosts), Objects: len(d.Objects)}
	for _, k := range d.KDKs {
		if k.Retired == nil {
			in.KDKVersions = append(in.KDKVersions, k.Version)
			if k.Primary {
				in.Primary = k.Version
			}
		}
	}
	return in
}

// Validate checks the document is complete and consistent: what Restore relies on.
func (d *Document) Validate() error {
	if d.Format != Format {
		return fmt.Errorf("format %q, want %q: %w", d.Format, Format, ErrBadArchive)
	}
	if d.Version != Version {
		return fmt.Errorf("document version %d, this nkp reads version %d; use the nkp release that wrote it: %w", d.Version, Version, ErrBadArchive)
	}
	if err := checkUUID("provider_id", d.ProviderID); err != nil {
		return err
	}
	if d.Created.IsZero() {
		return fmt.Errorf("created time missing: %w", ErrBadArchive)
	}
	if len(d.KDKs) == 0 {
		return fmt.Errorf("no KDK versions: %w", ErrBadArchive)
	}
	kdkVersion := map[string]int{}
	versions := map[int]bool{}
	primaries := 0
	for i, k := range d.KDKs {
		if err := checkUUID(fmt.Sprintf("kdks[%d].id", i), k.ID); err != nil {
			return err
		}
		if k.Version < 1 || versions[k.Version] {
			return fmt.Errorf("kdks[%d]: version %d is not positive or repeats: %w", i, k.Version, ErrBadArchive)
		}
		if _, dup := kdkVersion[k.ID]; dup {
			return fmt.Errorf("kdks[%d]: id %s repeats: %w", i, k.ID, ErrBadArchive)
		}
		versions[k.Version] = true
		kdkVersion[k.ID] = k.Version
		switch {
		case k.Retired == nil && len(k.Key) != KeySize:
			return fmt.Errorf("kdks[%d] (version %d): key is %d bytes, want %d: %w", i, k.Version, len(k.Key), KeySize, ErrBadArchive)
		case k.Retired != nil && (len(k.Key) != 0 || k.Primary):
			return fmt.Errorf("kdks[%d] (version %d): retired but still has a key or is primary: %w", i, k.Version, ErrBadArchive)
		}
		if k.Primary {
			primaries++
		}
	}
	if primaries != 1 {
		return fmt.Errorf("%d primary KDK versions, want exactly 1: %w", primaries, ErrBadArchive)
	}
	if _, err := ca.Parse(d.CA.Cert, d.CA.Key); err != nil {
		return fmt.Errorf("ca: %w: %w", ErrBadArchive, err)
	}
	hosts := map[string]bool{}
	for i, h := range d.Hosts {
		if err := checkUUID(fmt.Sprintf("hosts[%d].id", i), h.ID); err != nil {
			return err
		}
		if hosts[h.ID] {
			return fmt.Errorf("hosts[%d]: id %s repeats: %w", i, h.ID, ErrBadArchive)
		}
		hosts[h.ID] = true
		if h.CertSerial == "" {
			return fmt.Errorf("hosts[%d] (%s): certificate serial missing: %w", i, h.ID, ErrBadArchive)
		}
	}
	serials := map[string]bool{}
	for i, a := range d.Admins {
		if !ca.IsSerial(a.Serial) {
			return fmt.Errorf("admins[%d]: serial %.44q is not lower-case hex: %w", i, a.Serial, ErrBadArchive)
		}
		if serials[a.Serial] {
			return fmt.Errorf("admins[%d]: serial %s repeats: %w", i, a.Serial, ErrBadArchive)
		}
		serials[a.Serial] = true
		if len(a.Name) > 253 {
			return fmt.Errorf("admins[%d]: name longer than 253 bytes: %w", i, ErrBadArchive)
		}
	}
	objects := map[string]bool{}
	for i, o := range d.Objects {
		if err := checkUUID(fmt.Sprintf("objects[%d].vm_uuid", i), o.VMUUID); err != nil {
			return err
		}
		if err := checkUUID(fmt.Sprintf("objects[%d].key_id", i), o.KeyID); err != nil {
			return err
		}
		if o.Name == "" {
			return fmt.Errorf("objects[%d]: name missing: %w", i, ErrBadArchive)
		}
		if v, ok := kdkVersion[o.KDKID]; !ok || v != o.KDKVersion {
			return fmt.Errorf("objects[%d] (VM %s %s): KDK %s version %d is not in the archive: %w", i, o.VMUUID, o.Name, o.KDKID, o.KDKVersion, ErrBadArchive)
		}
		k := o.VMUUID + "/" + o.Name
		if objects[k] {
			return fmt.Errorf("objects[%d]: VM %s object %s repeats: %w", i, o.VMUUID, o.Name, ErrBadArchive)
		}
		objects[k] = true
	}
	return nil
}

func checkUUID(field, s string) error {
	if _, err := uuid.Parse(s); err != nil {
		return fmt.Errorf("%s %q is not a UUID: %w", field, s, ErrBadArchive)
	}
	return nil
}

// Marshal validates d and encodes it as indented JSON (the archive's plaintext).
func Marshal(d *Document) ([]byte, error) {
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("backup: refusing to write an invalid document: %w", err)
	}
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("backup: encoding document: %w", err)
	}
	return append(b, '\n'), nil
}

// Parse decodes and validates the plaintext document. It refuses unknown fields and
// trailing data.
func Parse(plaintext []byte) (*Document, error) {
	dec := json.NewDecoder(bytes.NewReader(plaintext))
	dec.DisallowUnknownFields()
	var d Document
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("backup document: %w: %w", ErrBadArchive, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("backup document: trailing data after the JSON object: %w", ErrBadArchive)
	}
	if err := d.Validate(); err != nil {
		d.Wipe()
		return nil, fmt.Errorf("backup document: %w", err)
	}
	return &d, nil
}

// The passphrase rule (CheckPassphrase). The archive holds every KDK and the CA key,
// and anyone who copies it can guess passphrases offline for as long as they like; age's
// scrypt at DefaultWorkFactor makes each guess cost about a second of CPU and 256 MiB, so
// a phrase of five random words (~64 bits, what `age -p` and diceware make) is out of
// reach, while a word or a short PIN falls in hours. A provider cannot see how a phrase
// was chosen; it can refuse the ones that are certainly weak: short ones, and long ones
// made of a few characters repeated.
const (
	// MinPassphraseChars is the fewest characters (Unicode code points) a passphrase has.
	MinPassphraseChars = 16
	// MinPassphraseDistinct is the fewest different characters among them.
	MinPassphraseDistinct = 8
	// PassphraseRule says the rule in the words errors and docs use.
	PassphraseRule = "at least 16 characters, at least 8 of them different (five random words, as `age -p` or diceware make, pass)"
)

// ErrWeakPassphrase: a passphrase for a new archive breaks the passphrase rule.
var ErrWeakPassphrase = errors.New("backup passphrase too weak")

// CheckPassphrase returns an error wrapping ErrWeakPassphrase, naming the rule, unless
// passphrase is good enough to write an archive with. Reading old archives applies no rule.
func CheckPassphrase(passphrase []byte) error {
	if len(passphrase) == 0 {
		return fmt.Errorf("%w: it is empty; give one from a file, stdin or the prompt: %s", ErrWeakPassphrase, PassphraseRule)
	}
	if !utf8.Valid(passphrase) {
		return fmt.Errorf("%w: it is not UTF-8 text (age passphrases are strings): %s", ErrWeakPassphrase, PassphraseRule)
	}
	distinct := map[rune]bool{}
	n := 0
	for _, r := range string(passphrase) {
		n++
		distinct[r] = true
	}
	if n < MinPassphraseChars || len(distinct) < MinPassphraseDistinct {
		return fmt.Errorf("%w: it has %d characters, %d of them different; the rule is %s",
			ErrWeakPassphrase, n, len(distinct), PassphraseRule)
	}
	return nil
}

// Write encrypts d to w with age's scrypt recipient for passphrase, at age's default cost
// (DefaultWorkFactor: there is no way to ask for less). The passphrase must meet
// CheckPassphrase. It returns the number of bytes written.
func Write(w io.Writer, passphrase []byte, d *Document) (int64, error) {
	return write(w, passphrase, d, DefaultWorkFactor)
}

// write is Write at scrypt work factor wf; only this package's tests pass less than
// DefaultWorkFactor.
func write(w io.Writer, passphrase []byte, d *Document, wf int) (int64, error) {
	if err := CheckPassphrase(passphrase); err != nil {
		return 0, fmt.Errorf("backup: %w", err)
	}
	plain, err := Marshal(d)
	if err != nil {
		return 0, err
	}
	defer clear(plain)
	rcpt, err := age.NewScryptRecipient(string(passphrase))
	if err != nil {
		return 0, fmt.Errorf("backup: %w", err)
	}
	rcpt.SetWorkFactor(wf)
	cw := &countWriter{w: w}
	enc, err := age.Encrypt(cw, rcpt)
	if err != nil {
		return cw.n, fmt.Errorf("backup: starting age encryption: %w", err)
	}
	if _, err := enc.Write(plain); err != nil {
		return cw.n, fmt.Errorf("backup: writing archive: %w", err)
	}
	if err := enc.Close(); err != nil {
		return cw.n, fmt.Errorf("backup: finishing archive: %w", err)
	}
	return cw.n, nil
}

// Read decrypts and validates an archive. Wrong passphrase: ErrBadPassphrase; anything
// else wrong with the bytes: ErrBadArchive. The caller wipes the document when done.
func Read(r io.Reader, passphrase []byte) (*Document, int64, error) {
	return read(r, passphrase, MaxWorkFactor)
}

func read(r io.Reader, passphrase []byte, maxWorkFactor int) (*Document, int64, error) {
	if len(passphrase) == 0 {
		return nil, 0, fmt.Errorf("backup: empty passphrase: %w", ErrBadPassphrase)
	}
	id, err := age.NewScryptIdentity(string(passphrase))
	if err != nil {
		return nil, 0, fmt.Errorf("backup: %w", err)
	}
	id.SetMaxWorkFactor(maxWorkFactor)
	cr := &countReader{r: r}
	dec, err := age.Decrypt(cr, id)
	if err != nil {
		var nomatch *age.NoIdentityMatchError
		if errors.As(err, &nomatch) {
			return nil, cr.n, fmt.Errorf("backup: %w (or the archive is not passphrase-encrypted): %w", ErrBadPassphrase, err)
		}
		return nil, cr.n, fmt.Errorf("backup: not a readable age archive: %w: %w", ErrBadArchive, err)
	}
	plain, err := io.ReadAll(io.LimitReader(dec, MaxPlaintext+1))
	defer clear(plain)
	if err != nil {
		return nil, cr.n, fmt.Errorf("backup: archive truncated or altered: %w: %w", ErrBadArchive, err)
	}
	if len(plain) > MaxPlaintext {
		return nil, cr.n, fmt.Errorf("backup: document larger than %d bytes: %w", MaxPlaintext, ErrBadArchive)
	}
	d, err := Parse(plain)
	if err != nil {
		return nil, cr.n, err
	}
	return d, cr.n, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
