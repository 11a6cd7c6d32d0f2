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
	payload, plain, _, err = decodeFileSlots(name, file, s, key, acceptPlain)
	return payload, plain, err
}

// decodeFileSlots is decodeFile that also locates the newest record of a slotted nkp
// file (nil for the other formats).
func decodeFileSlots(name string, file []byte, s *sealer, key []byte, acceptPlain bool) (payload []byte, plain bool, slots *slotInfo, err error) {
	typ := blobTypes[name]
	if bytes.HasPrefix(file, []byte(fileMagic)) {
		if s == nil {
			return nil, false, nil, ErrNeedKey
		}
		if len(file) > 8 && file[8] == fileVersionSlots {
			p, info, err := s.openSlots(typ, file)
			if err != nil {
				return nil, false, nil, err
			}
			return p, false, &info, nil
		}
		p, err := s.open(typ, file)
		return p, false, nil, err
	}
	payload, plain, err = decodeOther(file, key, acceptPlain)
	return payload, plain, nil, err
}

// decodeOther reads swtpm's formats: plaintext, or encrypted with --key.
func decodeOther(file []byte, key []byte, acceptPlain bool) (payload []byte, plain bool, err error) {
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

// nkp's slotted state file (format version 2, written whenever a key is set): two
// slots of S bytes each, the file exactly 2·S bytes. A Store after the first overwrites
// the slot that does not hold the newest record in place and makes it durable with one
// fdatasync, instead of a new file, fsync, rename and fsync of the directory: on this
// project's virtio disk ~0.2 ms against ~1 ms, and cheaper than swtpm's unsynced new
// file and rename. A crash or power loss during the overwrite can only damage that
// slot, which then fails authentication; the reader takes the newest slot that opens.
//
// Each slot:
//
//	offset size
//	0      32   the version 1 header (magic, version 2, blob type, flags, key id, nonce)
//	32     8    sequence number, big-endian: one more than the slot it replaces
//	40     4    slot size S, big-endian (must equal the file's size / 2)
//	44     4    payload length n, big-endian
//	48     n+16 AES-256-GCM ciphertext and tag of the payload
//	...         unused up to S (zeros, or what an older record left)
//
// The 48 header bytes are the additional data, so the sequence number, sizes and blob
// type are authenticated along with the payload.
const (
	fileVersionSlots = 2
	slotHeaderSize   = 48
	slotAlign        = 4096
)

// slotInfo locates the newest record of a slotted file: where the next in-place write
// goes, and with which sequence number.
type slotInfo struct {
	size int    // S
	seq  uint64 // sequence number of the newest record
	cur  int    // slot (0 or 1) that holds it
}

// slotSizeFor returns the slot size for a payload of n bytes: room for a quarter more
// (libtpms' permanent state grows as NV indices and persistent objects are added),
// rounded up to whole pages so that an in-place write touches as few pages as it can.
func slotSizeFor(n int) int {
	need := slotHeaderSize + n + n/4 + 16
	return (need + slotAlign - 1) / slotAlign * slotAlign
}

// sealSlot returns the record (header and ciphertext, at most size bytes) for payload
// of blob type typ with sequence number seq, for a slot of size bytes.
func (s *sealer) sealSlot(typ byte, seq uint64, size int, payload []byte) ([]byte, error) {
	n := slotHeaderSize + len(payload) + s.aead.Overhead()
	if n > size {
		return nil, fmt.Errorf("%d-byte record does not fit a %d-byte slot", n, size)
	}
	out := make([]byte, slotHeaderSize, n)
	copy(out, fileMagic)
	out[8] = fileVersionSlots
	out[9] = typ
	copy(out[12:], s.keyID[:])
	if _, err := rand.Read(out[20:32]); err != nil {
		return nil, fmt.Errorf("random nonce: %w", err)
	}
	binary.BigEndian.PutUint64(out[32:], seq)
	binary.BigEndian.PutUint32(out[40:], uint32(size))
	binary.BigEndian.PutUint32(out[44:], uint32(len(payload)))
	return s.aead.Seal(out, out[20:32], payload, out[:slotHeaderSize]), nil
}

// newSlotFile returns a whole slotted file whose slot 0 holds record and slot 1 is
// empty (zeros, which never authenticate).
func newSlotFile(record []byte, size int) []byte {
	f := make([]byte, 2*size)
	copy(f, record)
	return f
}

// openSlots decrypts the newest slot of a slotted file that authenticates as blob type
// typ. When none does, the error says why the most telling slot failed: another blob
// type, then a wrong key, then damage, then plain garbage.
func (s *sealer) openSlots(typ byte, file []byte) ([]byte, slotInfo, error) {
	size := len(file) / 2
	if size < slotHeaderSize+s.aead.Overhead() || len(file)%2 != 0 {
		return nil, slotInfo{}, fmt.Errorf("%w: %d bytes is not two slots", ErrCorrupt, len(file))
	}
	var (
		best     []byte
		info     slotInfo
		found    bool
		errType  error
		errKey   error
		errAuth  error
		errShape error
	)
	for i := range 2 {
		rec := file[i*size : (i+1)*size]
		switch {
		case !bytes.HasPrefix(rec, []byte(fileMagic)) || rec[8] != fileVersionSlots ||
			binary.BigEndian.Uint16(rec[10:]) != 0 || int(binary.BigEndian.Uint32(rec[40:])) != size:
			errShape = fmt.Errorf("%w: slot %d has no valid header", ErrCorrupt, i)
			continue
		case rec[9] != typ:
			errType = fmt.Errorf("%w: holds type %d, expected %d", ErrBlobType, rec[9], typ)
			continue
		case !hmac.Equal(rec[12:20], s.keyID[:]):
			errKey = &hinted{ErrAuth, fmt.Sprintf("it was written under key id %x, this key's id is %x: most likely the wrong key", rec[12:20], s.keyID)}
			continue
		}
		n := int(binary.BigEndian.Uint32(rec[44:]))
		if n > size-slotHeaderSize-s.aead.Overhead() {
			errShape = fmt.Errorf("%w: slot %d: payload length %d does not fit", ErrCorrupt, i, n)
			continue
		}
		p, err := s.aead.Open(nil, rec[20:32], rec[slotHeaderSize:slotHeaderSize+n+s.aead.Overhead()], rec[:slotHeaderSize])
		if err != nil {
			errAuth = &hinted{ErrAuth, "the key id matches, so the file itself is damaged; restore it from a backup"}
			continue
		}
		seq := binary.BigEndian.Uint64(rec[32:])
		if found && seq <= info.seq {
			clear(p)
			continue
		}
		clear(best)
		best, info, found = p, slotInfo{size: size, seq: seq, cur: i}, true
	}
	if found {
		return best, info, nil
	}
	for _, err := range []error{errType, errKey, errAuth, errShape} {
		if err != nil {
			return nil, slotInfo{}, err
		}
	}
	return nil, slotInfo{}, ErrCorrupt
}
