// Package envelope encodes and decodes swtpm's blob envelope byte for byte: the header
// and tag-length-value layout that swtpm puts around every state file and every state
// blob it sends over the control channel (GET/SET_STATEBLOB), with swtpm's AES-CBC +
// HMAC-SHA256 encryption (specs/swtpm-protocol.md §4).
//
// It is pure: no I/O, no logging. swtpm/state uses it for swtpm-format state files and
// the swtpm server uses it for migration blobs, so that state moves between swtpm and
// nkp-swtpm in both directions. Keys are 16 or 32 bytes (AES-128 or AES-256); this
// package never keeps them.
//
// Checked against swtpm 0.7.1: fixtures in testdata, and (when swtpm is installed)
// swtpm_ioctl --save and --load in both directions.
package envelope

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Header field values that swtpm writes.
const (
	Version    = 2  // version of the envelope that swtpm writes
	MinVersion = 1  // minimum version a reader must support to read it
	HeaderSize = 10 // bytes: u8 version, u8 min_version, u16 hdrsize, u16 flags, u32 totlen
	tlvHdrSize = 6  // u16 tag, u32 length
)

// Header flags (swtpm's BLOB_FLAG_*).
const (
	FlagEncrypted          uint16 = 0x01 // the data layer is encrypted with the state key
	FlagMigrationEncrypted uint16 = 0x02 // the migration layer is encrypted with the migration key
	FlagMigrationData      uint16 = 0x04 // the blob is a migration blob (TLV 4 or 5 outside)
	FlagStateKey256        uint16 = 0x08 // the state key is 256 bits
	FlagMigrationKey256    uint16 = 0x10 // the migration key is 256 bits
)

// TLV tags (swtpm's TAG_*).
const (
	TagData                   uint16 = 1
	TagEncryptedData          uint16 = 2
	TagHMAC                   uint16 = 3
	TagMigrationData          uint16 = 4
	TagEncryptedMigrationData uint16 = 5
	TagIV                     uint16 = 6
	TagMigrationIV            uint16 = 7
)

// Flags of the GET/SET_STATEBLOB requests and replies (PTM_STATE_FLAG_*).
const (
	// StateFlagDecrypted in a GET request asks for the state key's layer to be removed
	// (QEMU always sets it).
	StateFlagDecrypted uint32 = 1
	// StateFlagEncrypted in a GET reply says the data layer is still encrypted with the
	// state key; in a SET request it says the same of the blob sent.
	StateFlagEncrypted uint32 = 2
)

// Errors. Each maps to the result code swtpm sends for it (see ResultCode).
var (
	// ErrMalformed: the bytes are not a well-formed envelope (short, length mismatch,
	// bad header size, missing TLV).
	ErrMalformed = errors.New("malformed swtpm blob")
	// ErrVersion: the envelope needs a newer reader than version 2.
	ErrVersion = errors.New("unsupported swtpm blob version")
	// ErrKeyNotFound: the blob is encrypted and no key for it was given.
	ErrKeyNotFound = errors.New("blob is encrypted and no key was given for it")
	// ErrNotEncrypted: a key was given but the blob is not encrypted.
	ErrNotEncrypted = errors.New("blob is not encrypted but a key was given")
	// ErrKeySize: the key is not 16 or 32 bytes, or not the size the blob was made with.
	ErrKeySize = errors.New("wrong key size")
	// ErrAuth: the HMAC does not match: a wrong key or a corrupted blob.
	ErrAuth = errors.New("authentication failed: wrong key or corrupted blob")
)

// Result codes swtpm returns on the control channel (TPM 1.2 numbering).
const (
	resBadParameter   = 0x03
	resFail           = 0x09
	resKeyNotFound    = 0x0d
	resDecryptError   = 0x21
	resBadKeyProperty = 0x28
	resBadDataSize    = 0x2b
	resBadVersion     = 0x2e
)

// ResultCode returns the control-channel result code swtpm sends for err, an error from
// this package (0 for nil, 9 FAIL for errors not from here).
func ResultCode(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errBadHdrSize):
		return resBadDataSize
	case errors.Is(err, errBadLength):
		return resBadParameter
	case errors.Is(err, ErrVersion):
		return resBadVersion
	case errors.Is(err, ErrKeyNotFound):
		return resKeyNotFound
	case errors.Is(err, ErrKeySize):
		return resBadKeyProperty
	case errors.Is(err, ErrAuth):
		return resDecryptError
	default:
		return resFail
	}
}

// Finer kinds of ErrMalformed, for ResultCode.
var (
	errBadLength  = fmt.Errorf("%w: length", ErrMalformed)
	errBadHdrSize = fmt.Errorf("%w: header size", ErrMalformed)
)

// Header is the 10-byte big-endian header in front of every blob.
type Header struct {
	Version    uint8
	MinVersion uint8
	HdrSize    uint16
	Flags      uint16
	TotLen     uint32 // header included
}

// ParseHeader checks blob's header as swtpm does and returns it with the body after it.
// totlen must equal len(blob), hdrsize must be 10, min_version at most 2, and version 1
// or 2.
func ParseHeader(blob []byte) (Header, []byte, error) {
	if len(blob) < HeaderSize {
		return Header{}, nil, fmt.Errorf("%w: %d bytes, the header alone is %d", errBadLength, len(blob), HeaderSize)
	}
	h := Header{
		Version:    blob[0],
		MinVersion: blob[1],
		HdrSize:    binary.BigEndian.Uint16(blob[2:]),
		Flags:      binary.BigEndian.Uint16(blob[4:]),
		TotLen:     binary.BigEndian.Uint32(blob[6:]),
	}
	if uint64(h.TotLen) != uint64(len(blob)) {
		return Header{}, nil, fmt.Errorf("%w: header says %d bytes, blob has %d (truncated or trailing bytes)", errBadLength, h.TotLen, len(blob))
	}
	if h.MinVersion > Version {
		return Header{}, nil, fmt.Errorf("%w: blob needs version %d, this reader has %d", ErrVersion, h.MinVersion, Version)
	}
	if h.HdrSize != HeaderSize {
		return Header{}, nil, fmt.Errorf("%w: %d, want %d", errBadHdrSize, h.HdrSize, HeaderSize)
	}
	if h.Version != 1 && h.Version != 2 {
		return Header{}, nil, fmt.Errorf("%w: version %d", ErrVersion, h.Version)
	}
	return h, blob[HeaderSize:], nil
}

// AppendHeader appends a version-2 header with flags for a body of bodyLen bytes.
func AppendHeader(dst []byte, flags uint16, bodyLen int) []byte {
	dst = append(dst, Version, MinVersion)
	dst = binary.BigEndian.AppendUint16(dst, HeaderSize)
	dst = binary.BigEndian.AppendUint16(dst, flags)
	return binary.BigEndian.AppendUint32(dst, uint32(HeaderSize+bodyLen))
}

// TLV is one tag-length-value item.
type TLV struct {
	Tag   uint16
	Value []byte
}

// AppendTLVs appends each item as u16 tag, u32 length, value.
func AppendTLVs(dst []byte, items ...TLV) []byte {
	for _, it := range items {
		dst = binary.BigEndian.AppendUint16(dst, it.Tag)
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(it.Value)))
		dst = append(dst, it.Value...)
	}
	return dst
}

// Find returns the value of the first item tagged tag in the TLV stream b, walking it
// as swtpm does: it stops (not found) at an item that runs past the end.
func Find(b []byte, tag uint16) ([]byte, bool) {
	for len(b) >= tlvHdrSize {
		t := binary.BigEndian.Uint16(b)
		n := binary.BigEndian.Uint32(b[2:])
		b = b[tlvHdrSize:]
		if uint64(n) > uint64(len(b)) {
			return nil, false
		}
		if t == tag {
			return b[:n:n], true
		}
		b = b[n:]
	}
	return nil, false
}

// Encode returns a version-2 blob: the header with flags, then the items.
func Encode(flags uint16, items ...TLV) []byte {
	n := 0
	for _, it := range items {
		n += tlvHdrSize + len(it.Value)
	}
	out := make([]byte, 0, HeaderSize+n)
	out = AppendHeader(out, flags, n)
	return AppendTLVs(out, items...)
}

// EncodeFile returns data as swtpm writes it to a state file: plain (flags 0, TLV
// DATA) when key is nil, otherwise encrypted with key (flags ENCRYPTED and, for a
// 32-byte key, 256BIT; TLVs ENCRYPTED_DATA, HMAC, IV).
func EncodeFile(data, key []byte) ([]byte, error) {
	if key == nil {
		return Encode(0, TLV{TagData, data}), nil
	}
	items, err := encrypt(key, data, TagEncryptedData, TagIV)
	if err != nil {
		return nil, err
	}
	flags := FlagEncrypted
	if len(key) == 32 {
		flags |= FlagStateKey256
	}
	return Encode(flags, items...), nil
}

// DecodeFile returns the payload of a swtpm state file. With a nil key the file must be
// plain; with a key it must be encrypted with that key, as swtpm requires. Errors wrap
// ErrMalformed, ErrVersion, ErrKeyNotFound, ErrNotEncrypted, ErrKeySize or ErrAuth.
func DecodeFile(blob, key []byte) ([]byte, error) {
	h, body, err := ParseHeader(blob)
	if err != nil {
		return nil, err
	}
	encrypted := h.Flags&FlagEncrypted != 0
	switch {
	case key == nil && encrypted:
		return nil, ErrKeyNotFound
	case key == nil:
		return plainData(body, TagData, h.Version)
	case !encrypted:
		return nil, ErrNotEncrypted
	}
	return decrypt(key, body, TagEncryptedData, TagIV, h.Version, h.Flags&FlagStateKey256 != 0)
}

// plainData returns the value of tag (version 2) or the whole body (version 1), copied.
func plainData(body []byte, tag uint16, version uint8) ([]byte, error) {
	if version == 1 {
		return append([]byte{}, body...), nil
	}
	v, ok := Find(body, tag)
	if !ok {
		return nil, fmt.Errorf("%w: no TLV %d", ErrMalformed, tag)
	}
	return append([]byte{}, v...), nil
}

// DecodeHeaderless returns the payload of a state file that swtpm wrote encrypted
// before it had a blob header (swtpm's "version 1" files: the whole file is AES-CBC
// with a zero IV over SHA-256(data) || data, padded to a multiple of the key length
// with bytes that each hold the pad length). swtpm 0.7.1 still reads them: a file whose
// header does not check is read this way when a key is set. The key's length selects
// AES-128 or AES-256 (the swtpm of that era took 128-bit keys only). A wrong key or a
// damaged file gives ErrAuth.
func DecodeHeaderless(blob, key []byte) ([]byte, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	return decryptV1(key, blob)
}
