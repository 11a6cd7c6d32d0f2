package rootkey

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/protobuf/proto"

	"github.com/nkp-dev/nkp/internal/tpmdev"
)

// sealedMagic starts a root key file sealed to a TPM; the rest is a go-tpm-tools
// pb.SealedBytes (proto).
const sealedMagic = "nkp-rootkey-tpm-v1\n"

// maxSealedFile bounds a TPM-sealed root key file.
const maxSealedFile = 16 << 10

// ErrSealed: Load found a root key sealed to a TPM; use LoadSealed with that TPM.
var ErrSealed = errors.New("root key is sealed to a TPM")

// CreateSealed makes a new random root key and writes it to path (0600, crash-safe, never
// over an existing file) sealed to the TPM behind rw, under its ECC storage root key
// (owner hierarchy) without a PCR policy: only this TPM can unseal the file, and a
// firmware or kernel update does not lock the provider out. Clearing the TPM's owner
// hierarchy destroys the key; the provider then needs its backup.
//
// tpm is the host's TPM, opened with tpmdev.Open (e.g. /dev/tpmrm0), or a simulator in
// tests.
func CreateSealed(path string, tpm transport.TPM) (*Key, error) {
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("root key %s: %w; load it instead, or move it away if this provider is to be re-created", path, ErrExists)
	}
	b := make([]byte, Size)
	defer clear(b)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		return nil, fmt.Errorf("root key %s: reading random bytes: %w", path, err)
	}
	srk, err := client.StorageRootKeyECC(tpmdev.ReadWriter(tpm))
	if err != nil {
		return nil, fmt.Errorf("root key %s: loading the TPM's storage root key: %w", path, err)
	}
	defer srk.Close()
	sealed, err := srk.Seal(b, client.SealOpts{})
	if err != nil {
		return nil, fmt.Errorf("root key %s: sealing to the TPM: %w", path, err)
	}
	enc, err := proto.Marshal(sealed)
	if err != nil {
		return nil, fmt.Errorf("root key %s: encoding the sealed key: %w", path, err)
	}
	if err := writeNew(path, append([]byte(sealedMagic), enc...)); err != nil {
		return nil, err
	}
	return New(b, path)
}

// LoadSealed reads a root key file made by CreateSealed and unseals it with tpm.
// Another TPM, or this one after its owner hierarchy was cleared, fails.
func LoadSealed(path string, tpm transport.TPM) (*Key, error) {
	data, err := readPrivate(path, maxSealedFile)
	if err != nil {
		return nil, err
	}
	enc, ok := bytes.CutPrefix(data, []byte(sealedMagic))
	if !ok {
		return nil, fmt.Errorf("root key %s: not a TPM-sealed root key file (use Load for a plain one): %w", path, ErrBadFile)
	}
	var sealed pb.SealedBytes
	if err := proto.Unmarshal(enc, &sealed); err != nil {
		return nil, fmt.Errorf("root key %s: sealed key unreadable: %w: %w", path, ErrBadFile, err)
	}
	srk, err := client.StorageRootKeyECC(tpmdev.ReadWriter(tpm))
	if err != nil {
		return nil, fmt.Errorf("root key %s: loading the TPM's storage root key: %w", path, err)
	}
	defer srk.Close()
	b, err := srk.Unseal(&sealed, client.UnsealOpts{})
	if err != nil {
		return nil, fmt.Errorf("root key %s: this TPM does not unseal it (another machine's TPM, or its owner hierarchy was cleared); "+
			"restore the provider from its backup: %w", path, err)
	}
	defer clear(b)
	return New(b, path)
}

// readPrivate reads a regular file of at most limit bytes that group and others cannot
// read.
func readPrivate(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("root key %s: %w (it is made by `nkp-provider init`)", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("root key %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("root key %s: not a regular file: %w", path, ErrBadFile)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("root key %s: mode %04o lets group or others read it; run chmod 600 %s: %w", path, perm, path, ErrBadFile)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("root key %s: reading: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("root key %s: larger than %d bytes: %w", path, limit, ErrBadFile)
	}
	return data, nil
}
