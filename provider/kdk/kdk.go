// Package kdk derives per-object keys from a cluster Key Derivation Key (KDK), exactly as
// DESIGN.md's key hierarchy says:
//
//	key = HKDF-SHA256(ikm = KDK, salt = none, info = "nkp/v1/" purpose "/" vm-uuid "/" key-id), 32 bytes
//
// Purposes are "vtpm" (the vTPM state key given to nkp-swtpm by fd), "vtpm-migration"
// (the key of the vTPM state blobs that QEMU carries in its migration stream and in
// `virsh save` images: every host of the cluster derives the same one, so a VM migrates
// and restores between nkp hosts, and the blobs are never plaintext) and "disk" (the LUKS
// passphrase of one disk). A key ID is a random UUID per protected object (NewKeyID); the
// domain XML and the provider's catalog carry it, so every host holding the KDK derives
// the same key for a VM (migration, restore on another host).
//
// The package is pure and uses only the standard library: hostd, nkpctl and tests may
// import it; it must not import anything of nkp. Callers own the returned buffers and
// wipe them (clear) when done. Test vectors, computed by an independent implementation
// of RFC 5869, are in testdata/vectors.json.
package kdk

import (
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
)

// Size is the length of a KDK and of every derived key, in bytes.
const Size = 32

// Purposes of derived keys.
const (
	PurposeVTPM          = "vtpm"           // vTPM state key (nkp-swtpm --key fd=N,format=binary)
	PurposeVTPMMigration = "vtpm-migration" // vTPM state blobs in transit (nkp-swtpm --migration-key)
	PurposeDisk          = "disk"           // LUKS passphrase of one disk
)

// ErrInvalid is wrapped by every error about a bad argument (wrong KDK length, unknown
// purpose, a VM UUID or key ID not in canonical form).
var ErrInvalid = errors.New("invalid key derivation input")

// Info returns the HKDF info string for an object: "nkp/v1/" purpose "/" vmUUID "/" keyID.
// It does not validate its arguments; Derive does.
func Info(purpose, vmUUID, keyID string) string {
	return "nkp/v1/" + purpose + "/" + vmUUID + "/" + keyID
}

// Derive returns the 32-byte key of one protected object. kdk must be Size bytes, purpose
// one of the Purpose constants, and vmUUID and keyID UUIDs in canonical lower-case form
// (as libvirt prints domain UUIDs and NewKeyID makes key IDs): another spelling of the
// same UUID would derive another key, so it is refused rather than silently accepted.
// kdk is not modified; the caller wipes the result.
func Derive(kdk []byte, purpose, vmUUID, keyID string) ([]byte, error) {
	if len(kdk) != Size {
		return nil, fmt.Errorf("%w: KDK is %d bytes, want %d", ErrInvalid, len(kdk), Size)
	}
	if purpose != PurposeVTPM && purpose != PurposeVTPMMigration && purpose != PurposeDisk {
		return nil, fmt.Errorf("%w: purpose %q: want %q, %q or %q", ErrInvalid, purpose, PurposeVTPM, PurposeVTPMMigration, PurposeDisk)
	}
	if err := CheckUUID(vmUUID); err != nil {
		return nil, fmt.Errorf("vm uuid: %w", err)
	}
	if err := CheckUUID(keyID); err != nil {
		return nil, fmt.Errorf("key id: %w", err)
	}
	k, err := hkdf.Key(sha256.New, kdk, nil, Info(purpose, vmUUID, keyID), Size)
	if err != nil {
		return nil, fmt.Errorf("derive %s key of vm %s (key %s): %w", purpose, vmUUID, keyID, err)
	}
	return k, nil
}

// CheckUUID returns nil if s is a UUID in canonical lower-case form
// (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, hex digits a-f and 0-9), else an error wrapping
// ErrInvalid that quotes s.
func CheckUUID(s string) error {
	if len(s) != 36 {
		return fmt.Errorf("%w: %q is not a UUID (want 36 characters like 0f8fad5b-d9cb-469f-a165-70867728950e)", ErrInvalid, s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return fmt.Errorf("%w: %q is not a UUID (dash expected at position %d)", ErrInvalid, s, i+1)
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return fmt.Errorf("%w: %q is not a lower-case UUID (character %d is %q)", ErrInvalid, s, i+1, c)
			}
		}
	}
	return nil
}

// NewKeyID returns a random (version 4) UUID for a new protected object.
func NewKeyID() string {
	var b [16]byte
	rand.Read(b[:]) // never fails (crypto/rand, Go ≥ 1.24)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hexd = "0123456789abcdef"
	out := make([]byte, 0, 36)
	for i, v := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out = append(out, '-')
		}
		out = append(out, hexd[v>>4], hexd[v&0x0f])
	}
	return string(out)
}
