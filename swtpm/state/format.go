package state

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// nkp's state file format version 1 (written by earlier nkp-swtpm; still read, and
// replaced by version 2, below, at the next write):
//
//	offset size
//	0      8    magic "NKPSTATE"
//	8      1    format version (1)
//	9      1    blob type: 1 permall, 2 volatilestate, 3 savestate
//	10     2    flags, big-endian (none defined; must be 0)
//	12     8    key id: HMAC-SHA256(key, "nkp/swtpm/state/v1/key-id")[:8]
//	20     12   nonce, fresh and random for every write
//	32     n+16 AES-256-GCM ciphertext and tag of the payload
//
// The AEAD key is HKDF-SHA256(key, info "nkp/swtpm/state/v1/aead"), so the same key can
// also serve swtpm's AES-CBC layers without two schemes sharing raw key bytes. The 32
// header bytes are the additional data: editing any of them, or renaming a file to
// another blob type, makes it fail to open. Version 2 uses the same key derivation.
const (
	fileMagic      = "NKPSTATE"
	fileVersion    = 1
	fileHeaderSize = 32
	keyIDSize      = 8
	nonceSize      = 12

	infoAEAD   = "nkp/swtpm/state/v1/aead"
	infoHeader = "nkp/swtpm/state/v3/header"
	infoKeyID  = "nkp/swtpm/state/v1/key-id"
)

// Errors of the state files; Dir wraps them with the file's path.
var (
	// ErrAuth: the file does not authenticate under the key: a wrong key or a
	// corrupted file.
	ErrAuth = errors.New("authentication failed: wrong key or corrupted file")
	// ErrNeedKey: the file is encrypted and no key was given.
	ErrNeedKey = errors.New("the file is encrypted and no key was given; pass the state key with --key")
	// ErrPlaintext: a key was given but the file is an unencrypted swtpm file.
	ErrPlaintext = errors.New("the file is not encrypted but a key was given (an unencrypted swtpm state?); to import it once, open the directory with AcceptPlaintext")
	// ErrCorrupt: the bytes are neither an nkp nor a swtpm state file, or are truncated.
	ErrCorrupt = errors.New("not a valid state file (truncated or garbage)")
	// ErrBlobType: the file holds another blob type than its name says.
	ErrBlobType = errors.New("the file holds another state blob than its name says (was it renamed?)")
	// ErrForeign: the file authenticates under the key but is bound to another state
	// directory (its state ID is not this directory's): it was copied from another
	// VM's directory that uses the same key.
	ErrForeign = errors.New("the file belongs to another state directory (its state ID is not this directory's)")
	// ErrRollback: the newest record of a slotted file fails authentication although
	// it was written completely before its write was acknowledged, so loading the
	// older record would silently undo an acknowledged write (a damaged or tampered
	// file, not a crash). Options.AcceptRollback loads the older record instead.
	ErrRollback = errors.New("a slot that may hold the newest record fails authentication; loading the older record would roll the TPM back")
)

// blobTypes numbers the blob names as the PTM blob types do.
var blobTypes = map[string]byte{"permall": 1, "volatilestate": 2, "savestate": 3}

// sealer encrypts and opens nkp state files under one key.
type sealer struct {
	aead  cipher.AEAD
	keyID [keyIDSize]byte
	// headerKey authenticates version-3 slot headers on their own (HMAC-SHA256,
	// HKDF-SHA256(key, info "nkp/swtpm/state/v3/header")), so that a slot whose body
	// fails authentication still tells truthfully which record it held.
	headerKey []byte
}

func newSealer(key []byte) (*sealer, error) {
	k, err := hkdf.Key(sha256.New, key, nil, infoAEAD, 32)
	if err != nil {
		return nil, fmt.Errorf("state key: derive AEAD key: %w", err)
	}
	defer clear(k)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, fmt.Errorf("state key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("state key: %w", err)
	}
	s := &sealer{aead: aead}
	if s.headerKey, err = hkdf.Key(sha256.New, key, nil, infoHeader, 32); err != nil {
		return nil, fmt.Errorf("state key: derive header key: %w", err)
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(infoKeyID))
	copy(s.keyID[:], m.Sum(nil))
	return s, nil
}

// seal returns the nkp file for payload of blob type typ.
func (s *sealer) seal(typ byte, payload []byte) ([]byte, error) {
	out := make([]byte, fileHeaderSize, fileHeaderSize+len(payload)+s.aead.Overhead())
	copy(out, fileMagic)
	out[8] = fileVersion
	out[9] = typ
	binary.BigEndian.PutUint16(out[10:], 0)
	copy(out[12:], s.keyID[:])
	if _, err := rand.Read(out[20:fileHeaderSize]); err != nil {
		return nil, fmt.Errorf("random nonce: %w", err)
	}
	return s.aead.Seal(out, out[20:fileHeaderSize], payload, out[:fileHeaderSize]), nil
}

// open checks and decrypts an nkp file that should hold blob type typ.
func (s *sealer) open(typ byte, file []byte) ([]byte, error) {
	if len(file) < fileHeaderSize+s.aead.Overhead() {
		return nil, fmt.Errorf("%w: %d bytes", ErrCorrupt, len(file))
	}
	if v := file[8]; v != fileVersion {
		return nil, fmt.Errorf("%w: nkp format version %d, this nkp-swtpm reads version %d", ErrCorrupt, v, fileVersion)
	}
	if file[9] != typ {
		return nil, fmt.Errorf("%w: holds type %d, expected %d", ErrBlobType, file[9], typ)
	}
	if f := binary.BigEndian.Uint16(file[10:]); f != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", ErrCorrupt, f)
	}
	if !hmac.Equal(file[12:20], s.keyID[:]) {
		return nil, &hinted{ErrAuth, fmt.Sprintf("it was written under key id %x, this key's id is %x: most likely the wrong key", file[12:20], s.keyID)}
	}
	p, err := s.aead.Open(nil, file[20:fileHeaderSize], file[fileHeaderSize:], file[:fileHeaderSize])
	if err != nil {
		return nil, &hinted{ErrAuth, "the key id matches, so the file itself is damaged; restore it from a backup"}
	}
	return p, nil
}

// hinted is an error with a hint that Dir puts at the end of its message, after the
// sentence every state error shares ("...; the file was left untouched").
type hinted struct {
	err  error
	hint string
}

func (h *hinted) Error() string { return h.err.Error() + " (" + h.hint + ")" }
func (h *hinted) Unwrap() error { return h.err }
