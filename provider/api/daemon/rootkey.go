package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/nkp-dev/nkp/internal/tpmdev"
	"github.com/nkp-dev/nkp/provider/rootkey"
)

// createRootKey makes the provider directory's root key: a 0600 file, or with tpmSpec
// (tpmdev.Open's forms) a file sealed to that TPM.
func createRootKey(dir, tpmSpec string) (*rootkey.Key, error) {
	path := filepath.Join(dir, RootKeyFile)
	if tpmSpec == "" {
		return rootkey.Create(path)
	}
	rw, err := tpmdev.Open(tpmSpec)
	if err != nil {
		return nil, fmt.Errorf("--root-key-tpm: %w", err)
	}
	defer rw.Close()
	k, err := rootkey.CreateSealed(path, rw)
	if err != nil {
		return nil, fmt.Errorf("--root-key-tpm %s: %w", tpmSpec, err)
	}
	return k, nil
}

// loadRootKey loads the provider directory's root key, unsealing it with the TPM named
// by tpmSpec when given. The error says which flag is missing or wrong.
func loadRootKey(dir, tpmSpec string) (*rootkey.Key, error) {
	path := filepath.Join(dir, RootKeyFile)
	if tpmSpec == "" {
		k, err := rootkey.Load(path)
		if errors.Is(err, rootkey.ErrSealed) {
			return nil, fmt.Errorf("root key %s: %w: give --root-key-tpm with the TPM it was sealed to (%s)", path, rootkey.ErrSealed, tpmdev.SpecHelp)
		}
		return k, err
	}
	if plain, err := rootkey.Load(path); err == nil {
		plain.Wipe()
		return nil, fmt.Errorf("--root-key-tpm %s: root key %s is a plain key file, not sealed to a TPM; leave --root-key-tpm out", tpmSpec, path)
	} else if errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	rw, err := tpmdev.Open(tpmSpec)
	if err != nil {
		return nil, fmt.Errorf("--root-key-tpm: %w", err)
	}
	defer rw.Close()
	k, err := rootkey.LoadSealed(path, rw)
	if err != nil {
		return nil, fmt.Errorf("--root-key-tpm %s: %w", tpmSpec, err)
	}
	return k, nil
}
