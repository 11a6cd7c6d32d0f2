package rootkey

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
)

func withTPM(t *testing.T, seed int64, fn func(sim transport.TPM)) {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatalf("simulator: %v", err)
	}
	defer sim.Close()
	fn(transport.FromReadWriter(sim))
}

func TestSealedRootKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "root.key")
	var sealed []byte
	withTPM(t, 1, func(sim transport.TPM) {
		k, err := CreateSealed(path, sim)
		if err != nil {
			t.Fatal(err)
		}
		if sealed, err = k.Seal([]byte("kdk"), []byte("ad")); err != nil {
			t.Fatal(err)
		}
		if _, err := CreateSealed(path, sim); !errors.Is(err, ErrExists) {
			t.Fatalf("second CreateSealed: %v, want ErrExists", err)
		}
	})
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("sealed file: %v, %v", st, err)
	}
	if _, err := Load(path); !errors.Is(err, ErrSealed) {
		t.Fatalf("Load of a sealed file: %v, want ErrSealed", err)
	}
	// The same TPM after a restart unseals it.
	withTPM(t, 1, func(sim transport.TPM) {
		k, err := LoadSealed(path, sim)
		if err != nil {
			t.Fatal(err)
		}
		if pt, err := k.Open(sealed, []byte("ad")); err != nil || string(pt) != "kdk" {
			t.Fatalf("key after LoadSealed does not open what the created one sealed: %q, %v", pt, err)
		}
	})
	// Another TPM does not.
	withTPM(t, 2, func(sim transport.TPM) {
		if _, err := LoadSealed(path, sim); err == nil {
			t.Fatal("another TPM unsealed the root key")
		}
		plain := filepath.Join(dir, "plain.key")
		if _, err := Create(plain); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadSealed(plain, sim); !errors.Is(err, ErrBadFile) {
			t.Fatalf("LoadSealed of a plain key file: %v, want ErrBadFile", err)
		}
	})
}
