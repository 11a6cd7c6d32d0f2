package state

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

const fixtures = "testdata/swtpm-0.7.1"

// copyFixture copies a fixture state directory to a fresh temporary directory (Open
// creates .lock and the tests write; testdata stays as checked in).
func copyFixture(t *testing.T, name string) string {
	t.Helper()
	dst := t.TempDir()
	for _, f := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
		b, err := os.ReadFile(filepath.Join(fixtures, name, f))
		if err != nil {
			t.Fatalf("fixture: %v", err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func fixtureKey(t *testing.T, opt string) *Key {
	t.Helper()
	if opt == "" {
		return nil
	}
	spec, err := ParseKeySpec(opt)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ParseKey(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Wipe)
	return k
}

// TestSwtpmFixtures reads state directories that swtpm 0.7.1 wrote (make-fixtures.sh),
// plain and encrypted with each kind of --key, and checks the permanent state against
// the payload swtpm itself sent for the same TPM. It then stores the state again (nkp's
// format when keyed) and reads it back: the path of a VM moving from swtpm to nkp.
func TestSwtpmFixtures(t *testing.T) {
	f := func(s string) string { return filepath.Join(fixtures, s) }
	tests := []struct {
		dir string
		key string // the --key option swtpm was given
	}{
		{"plain", ""},
		{"key256-hex", "file=" + f("key256.hex") + ",mode=aes-256-cbc"},
		{"key128-hex", "file=" + f("key128.hex")},
		{"pwd-pbkdf2", "pwdfile=" + f("passphrase.txt") + ",mode=aes-256-cbc"},
		{"pwd-sha512", "pwdfile=" + f("passphrase.txt") + ",mode=aes-256-cbc,kdf=sha512"},
	}
	for _, tt := range tests {
		t.Run(tt.dir, func(t *testing.T) {
			ref, err := os.ReadFile(filepath.Join(fixtures, tt.dir, "ref.permall"))
			if err != nil {
				t.Fatal(err)
			}
			dir := copyFixture(t, tt.dir)
			key := fixtureKey(t, tt.key)
			d := mustOpen(t, dir, Options{Key: key})
			perm, err := d.Load("permall")
			if err != nil {
				t.Fatalf("permall: %v", err)
			}
			if !bytes.Equal(perm, ref) {
				t.Fatalf("permall: %d bytes differ from swtpm's own payload (%d bytes)", len(perm), len(ref))
			}
			vol, err := d.Load("volatilestate")
			if err != nil || len(vol) < 1000 {
				t.Fatalf("volatilestate: %d bytes, %v", len(vol), err)
			}
			for name, data := range map[string][]byte{"permall": perm, "volatilestate": vol} {
				if err := d.Store(name, data); err != nil {
					t.Fatal(err)
				}
			}
			d.Close()
			d = mustOpen(t, dir, Options{Key: key})
			if again, err := d.Load("permall"); err != nil || !bytes.Equal(again, ref) {
				t.Fatalf("after re-store: %v", err)
			}
		})
	}
}

func TestSwtpmFixtureMismatches(t *testing.T) {
	f := func(s string) string { return filepath.Join(fixtures, s) }
	tests := []struct {
		name, dir, key string
		accept         bool
		want           error
	}{
		{"128-bit key on a 256-bit state", "key256-hex", "file=" + f("key128.hex"), false, ErrAuth},
		{"passphrase with the wrong kdf", "pwd-pbkdf2", "pwdfile=" + f("passphrase.txt") + ",mode=aes-256-cbc,kdf=sha512", false, ErrAuth},
		{"no key for an encrypted state", "key256-hex", "", false, ErrNeedKey},
		{"key for a plaintext state", "plain", "file=" + f("key256.hex"), false, ErrPlaintext},
		{"key for a plaintext state, import allowed", "plain", "file=" + f("key256.hex"), true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := copyFixture(t, tt.dir)
			before, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
			d := mustOpen(t, dir, Options{Key: fixtureKey(t, tt.key), AcceptPlaintext: tt.accept})
			_, err := d.Load("permall")
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			d.Close()
			if after, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall")); !bytes.Equal(before, after) {
				t.Errorf("the file changed")
			}
		})
	}
}
