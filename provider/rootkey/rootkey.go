// Package rootkey holds the provider root key: 32 random bytes in a 0600 file, made once at
// provider init, under which the provider seals everything secret that it keeps in its
// store (KDKs, the CA private key). The store alone therefore reveals no key; the root key
// file and the store together do, so keep them on different media in backups, or rely on
// the provider's age-encrypted backup archive instead of file copies.
//
// Sealing is AES-256-GCM with a random 96-bit nonce; the caller passes additional data
// that binds a sealed value to its place (the provider package uses provider ID + KDK ID),
// so a sealed value moved to another record or another provider fails to open.
//
// Sealed format: 1 byte version (1) || 12 bytes nonce || ciphertext || 16 bytes tag.
//
// The file holds the 32 bytes (Create, Load), or the key sealed to the provider host's TPM
// under its storage root key (CreateSealed, LoadSealed), so that a copy of the file is
// useless on any other machine.
//
// Only package provider and cmd/nkp-provider (to create or load the file) import this.
package rootkey

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

// Size is the root key length in bytes.
const Size = 32

const (
	sealVersion = 1
	nonceSize   = 12
	tagSize     = 16
	// Overhead is how many bytes Seal adds to the plaintext.
	Overhead = 1 + nonceSize + tagSize
)

// Errors, checked with errors.Is.
var (
	// ErrExists: Create found a file at the path already.
	ErrExists = errors.New("root key file already exists")
	// ErrBadFile: the root key file is not 32 bytes or is readable by group or others.
	ErrBadFile = errors.New("bad root key file")
	// ErrOpen: a sealed value did not open — the wrong root key, the wrong additional data,
	// or altered bytes.
	ErrOpen = errors.New("sealed value does not open with this root key")
	// ErrWiped: the key was wiped and can no longer be used.
	ErrWiped = errors.New("root key was wiped")
)

// Key is a provider root key. Methods are safe for concurrent use until Wipe.
type Key struct {
	aead  cipher.AEAD
	raw   []byte // kept only to wipe it; the AEAD holds its own expanded schedule
	path  string
	wiped bool
}

// New makes a Key from 32 bytes; it copies key, so the caller should wipe its own copy.
// path is only used in error messages (it may be empty).
func New(key []byte, path string) (*Key, error) {
	if len(key) != Size {
		return nil, fmt.Errorf("root key %s: %d bytes, want %d: %w", path, len(key), Size, ErrBadFile)
	}
	raw := make([]byte, Size)
	copy(raw, key)
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, fmt.Errorf("root key %s: %w", path, err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("root key %s: %w", path, err)
	}
	return &Key{aead: aead, raw: raw, path: path}, nil
}

// Generate makes a fresh random key that lives in memory only (tests, and Create).
func Generate() (*Key, error) {
	b := make([]byte, Size)
	defer clear(b)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		return nil, fmt.Errorf("root key: reading random bytes: %w", err)
	}
	return New(b, "")
}

// Create makes a new random root key and writes it to path with mode 0600, crash-safely
// (temp file, fsync, link into place, fsync directory). It refuses to replace an existing
// file (ErrExists): a root key that is overwritten makes its store unreadable.
func Create(path string) (*Key, error) {
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("root key %s: %w; load it instead, or move it away if this provider is to be re-created", path, ErrExists)
	}
	b := make([]byte, Size)
	defer clear(b)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		return nil, fmt.Errorf("root key %s: reading random bytes: %w", path, err)
	}
	if err := writeNew(path, b); err != nil {
		return nil, err
	}
	return New(b, path)
}

// writeNew writes a new root key file (0600) crash-safely, never over an existing one
// (a concurrent Create cannot be overwritten).
func writeNew(path string, data []byte) error {
	if err := atomicfile.WriteNew(path, data, 0o600); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("root key %s: %w", path, ErrExists)
		}
		return fmt.Errorf("root key: %w", err)
	}
	return nil
}

// Load reads the root key from path. The file must hold exactly 32 bytes and must not be
// readable or writable by group or others (chmod 600 it).
func Load(path string) (*Key, error) {
	b, err := readPrivate(path, maxSealedFile)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	if bytes.HasPrefix(b, []byte(sealedMagic)) {
		return nil, fmt.Errorf("root key %s: %w; open it with LoadSealed and that TPM", path, ErrSealed)
	}
	if len(b) != Size {
		return nil, fmt.Errorf("root key %s: file holds %d bytes, want exactly %d: %w", path, len(b), Size, ErrBadFile)
	}
	return New(b, path)
}

// Path is the file the key came from ("" for generated keys).
func (k *Key) Path() string { return k.path }

// Fingerprint is a short, one-way identifier of the key for error messages
// ("rk:" + 16 hex digits of SHA-256("nkp/v1/rootkey-fingerprint" || key)).
func (k *Key) Fingerprint() string {
	if k.wiped {
		return "rk:wiped"
	}
	h := sha256.New()
	h.Write([]byte("nkp/v1/rootkey-fingerprint"))
	h.Write(k.raw)
	return "rk:" + hex.EncodeToString(h.Sum(nil)[:8])
}

// Seal encrypts plaintext, bound to ad.
func (k *Key) Seal(plaintext, ad []byte) ([]byte, error) {
	if k.wiped {
		return nil, ErrWiped
	}
	out := make([]byte, 1+nonceSize, Overhead+len(plaintext))
	out[0] = sealVersion
	if _, err := io.ReadFull(rand.Reader, out[1:]); err != nil {
		return nil, fmt.Errorf("root key seal: reading nonce: %w", err)
	}
	return k.aead.Seal(out, out[1:1+nonceSize], plaintext, ad), nil
}

// Open decrypts a value made by Seal with the same ad. Any mismatch gives ErrOpen.
func (k *Key) Open(sealed, ad []byte) ([]byte, error) {
	if k.wiped {
		return nil, ErrWiped
	}
	if len(sealed) < Overhead {
		return nil, fmt.Errorf("sealed value of %d bytes is shorter than %d: %w", len(sealed), Overhead, ErrOpen)
	}
	if sealed[0] != sealVersion {
		return nil, fmt.Errorf("sealed value version %d, want %d: %w", sealed[0], sealVersion, ErrOpen)
	}
	pt, err := k.aead.Open(nil, sealed[1:1+nonceSize], sealed[1+nonceSize:], ad)
	if err != nil {
		return nil, ErrOpen
	}
	return pt, nil
}

// Wipe zeroes the key bytes this package holds; the Key is unusable afterwards.
// (The AES key schedule inside crypto/cipher cannot be reached to zero it.)
func (k *Key) Wipe() {
	clear(k.raw)
	k.aead = nil
	k.wiped = true
}
