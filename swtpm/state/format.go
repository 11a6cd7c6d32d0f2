package state

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

// nkp's state file format (written whenever a key is set):
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
// another blob type, makes it fail to open.
const (
	fileMagic      = "NKPSTATE"
	fileVersion    = 1
	fileHeaderSize = 32
	keyIDSize      = 8
	nonceSize      = 12

	infoAEAD  = "nkp/swtpm/state/v1/aead"
	infoKeyID = "nkp/swtpm/state/v1/key-id"
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
)

// blobTypes numbers the blob names as the PTM blob types do.
var blobTypes = map[string]byte{"permall": 1, "volatilestate": 2, "savestate": 3}

// sealer encrypts and opens nkp state files under one key.
type sealer struct {
	aead  cipher.AEAD
	keyID [keyIDSize]byte
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

// decodeFile reads a state file of either format. s and key are nil without a key.
func decodeFile(name string, file []byte, s *sealer, key []byte, acceptPlain bool) (payload []byte, plain bool, err error) {
	typ := blobTypes[name]
	if bytes.HasPrefix(file, []byte(fileMagic)) {
		if s == nil {
			return nil, false, ErrNeedKey
		}
		p, err := s.open(typ, file)
		return p, false, err
	}
	h, _, err := envelope.ParseHeader(file)
	if err != nil {
		return nil, false, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	encrypted := h.Flags&envelope.FlagEncrypted != 0
	switch {
	case encrypted && key == nil:
		return nil, false, ErrNeedKey
	case !encrypted && key != nil && !acceptPlain:
		return nil, true, ErrPlaintext
	case !encrypted:
		p, err := envelope.DecodeFile(file, nil)
		if err != nil {
			return nil, true, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		return p, true, nil
	}
	p, err := envelope.DecodeFile(file, key)
	switch {
	case errors.Is(err, envelope.ErrAuth):
		return nil, false, &hinted{ErrAuth, "a swtpm --key file whose HMAC does not match this key"}
	case errors.Is(err, envelope.ErrKeySize):
		return nil, false, &hinted{ErrAuth, "a swtpm --key file: " + err.Error()}
	case err != nil:
		return nil, false, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return p, false, nil
}
