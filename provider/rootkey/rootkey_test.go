package rootkey

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestCreateLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "root.key")
	k, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Size() != Size {
		t.Fatalf("file mode %v size %d, want 0600 and %d", st.Mode().Perm(), st.Size(), Size)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries, want only the key (temp file left?)", len(entries))
	}
	sealed, err := k.Seal([]byte("secret"), []byte("ad"))
	if err != nil {
		t.Fatal(err)
	}
	k2, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := k2.Open(sealed, []byte("ad"))
	if err != nil || string(pt) != "secret" {
		t.Fatalf("Open after Load = %q, %v", pt, err)
	}
	if k.Fingerprint() != k2.Fingerprint() {
		t.Fatalf("fingerprints differ: %s %s", k.Fingerprint(), k2.Fingerprint())
	}
	if _, err := Create(path); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create: %v, want ErrExists", err)
	}
}

func TestLoadRefuses(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"short", make([]byte, 31), 0o600},
		{"long", make([]byte, 33), 0o600},
		{"empty", nil, 0o600},
		{"group readable", make([]byte, 32), 0o640},
		{"world readable", make([]byte, 32), 0o604},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "root.key")
			if err := os.WriteFile(path, tt.data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tt.mode); err != nil {
				t.Fatal(err)
			}
			if _, err := Load(path); !errors.Is(err, ErrBadFile) {
				t.Fatalf("Load: %v, want ErrBadFile", err)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load of missing file: %v, want ErrNotExist", err)
	}
}

func TestSealOpen(t *testing.T) {
	k, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	other, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := k.Seal([]byte("kdk bytes"), []byte("provider/kdk-1"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, []byte("kdk bytes")) {
		t.Fatal("sealed value contains the plaintext")
	}
	flipped := bytes.Clone(sealed)
	flipped[len(flipped)-1] ^= 1
	tests := []struct {
		name   string
		key    *Key
		sealed []byte
		ad     string
	}{
		{"wrong ad", k, sealed, "provider/kdk-2"},
		{"wrong key", other, sealed, "provider/kdk-1"},
		{"flipped bit", k, flipped, "provider/kdk-1"},
		{"truncated", k, sealed[:Overhead-1], "provider/kdk-1"},
		{"bad version", k, append([]byte{9}, sealed[1:]...), "provider/kdk-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := tt.key.Open(tt.sealed, []byte(tt.ad)); !errors.Is(err, ErrOpen) {
				t.Fatalf("Open: %v, want ErrOpen", err)
			}
		})
	}
	pt, err := k.Open(sealed, []byte("provider/kdk-1"))
	if err != nil || string(pt) != "kdk bytes" {
		t.Fatalf("Open = %q, %v", pt, err)
	}
	k.Wipe()
	if _, err := k.Seal(nil, nil); !errors.Is(err, ErrWiped) {
		t.Fatalf("Seal after Wipe: %v, want ErrWiped", err)
	}
}
