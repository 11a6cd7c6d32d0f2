package state

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

const legacyFixtures = "testdata/swtpm-legacy"

// legacyCases are the header-less fixtures (testdata/swtpm-legacy/README.md): the same
// TPM as testdata/swtpm-0.7.1/plain, in the files swtpm wrote before its blob header,
// and the --key option each is read with (swtpm's syntax, paths relative to testdata).
var legacyCases = []struct {
	dir, key string
	keyBytes func(t *testing.T) []byte // the key the file was encrypted with; nil: bare
}{
	{"bare", "", nil},
	{"key128-hex", "file=swtpm-0.7.1/key128.hex", func(t *testing.T) []byte { return keyFromSpec(t, "file=testdata/swtpm-0.7.1/key128.hex") }},
	{"pwd-sha512", "pwdfile=swtpm-0.7.1/passphrase.txt,kdf=sha512", func(t *testing.T) []byte {
		pass, err := os.ReadFile("testdata/swtpm-0.7.1/passphrase.txt")
		if err != nil {
			t.Fatal(err)
		}
		k, err := envelope.DeriveKey(pass, 16, envelope.KDFSHA512)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}},
	{"key256-hex", "file=swtpm-0.7.1/key256.hex,mode=aes-256-cbc", func(t *testing.T) []byte {
		return keyFromSpec(t, "file=testdata/swtpm-0.7.1/key256.hex,mode=aes-256-cbc")
	}},
}

func keyFromSpec(t *testing.T, opt string) []byte {
	t.Helper()
	return bytes.Clone(fixtureKey(t, opt).Bytes())
}

// legacyPayloads returns the payloads of the reference TPM: permall as swtpm 0.7.1 sent
// it over the control channel, the volatile state from its plaintext file.
func legacyPayloads(t *testing.T) (perm, vol []byte) {
	t.Helper()
	perm, err := os.ReadFile(filepath.Join(fixtures, "plain", "ref.permall"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.ReadFile(filepath.Join(fixtures, "plain", "tpm2-00.volatilestate"))
	if err != nil {
		t.Fatal(err)
	}
	if vol, err = envelope.DecodeFile(f, nil); err != nil {
		t.Fatal(err)
	}
	return perm, vol
}

// TestLegacyFixtureBytes rebuilds every header-less fixture from the reference payloads
// with swtpm's algorithm (encryptHeaderless, written from swtpm's source) and checks the
// checked-in files byte for byte, so the fixtures are what their README says.
// NKP_UPDATE_FIXTURES=1 writes them instead.
func TestLegacyFixtureBytes(t *testing.T) {
	perm, vol := legacyPayloads(t)
	if !isLibtpmsBlob(perm, 1) || !isLibtpmsBlob(vol, 2) {
		t.Fatalf("reference payloads do not start with libtpms' magic: % x, % x", perm[:6], vol[:6])
	}
	for _, c := range legacyCases {
		for name, payload := range map[string][]byte{"permall": perm, "volatilestate": vol} {
			want := payload
			if c.keyBytes != nil {
				want = encryptHeaderless(c.keyBytes(t), payload)
			}
			p := filepath.Join(legacyFixtures, c.dir, FileName(name))
			if os.Getenv("NKP_UPDATE_FIXTURES") == "1" {
				os.MkdirAll(filepath.Dir(p), 0o755)
				if err := os.WriteFile(p, want, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := os.ReadFile(p)
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s: %d bytes, %v; not what swtpm's header-less format of the reference gives (%d bytes)", p, len(got), err, len(want))
			}
		}
	}
}

// TestLegacyFormats: nkp reads every header-less fixture as swtpm 0.7.1 does (the same
// payloads), rewrites it in its current format at the next Store and reads that back;
// the mismatches get their own errors and leave the file alone.
func TestLegacyFormats(t *testing.T) {
	perm, vol := legacyPayloads(t)
	for _, c := range legacyCases {
		t.Run(c.dir, func(t *testing.T) {
			dir := copyFixtureFrom(t, legacyFixtures, c.dir)
			key := fixtureKey(t, fixtureOpt(c.key))
			d := mustOpen(t, dir, Options{Key: key})
			gotPerm, err := d.Load("permall")
			if err != nil || !bytes.Equal(gotPerm, perm) {
				t.Fatalf("permall: %d bytes, %v; want swtpm's %d", len(gotPerm), err, len(perm))
			}
			gotVol, err := d.Load("volatilestate")
			if err != nil || !bytes.Equal(gotVol, vol) {
				t.Fatalf("volatilestate: %d bytes, %v", len(gotVol), err)
			}
			before, _ := os.ReadFile(filepath.Join(dir, FileName("permall")))
			if err := d.Store("permall", gotPerm); err != nil {
				t.Fatal(err)
			}
			after, _ := os.ReadFile(filepath.Join(dir, FileName("permall")))
			if bytes.Equal(before, after) {
				t.Errorf("the header-less file was not rewritten in the current format")
			}
			d.Close()
			if again, err := mustOpen(t, dir, Options{Key: key}).Load("permall"); err != nil || !bytes.Equal(again, perm) {
				t.Fatalf("after rewrite: %v", err)
			}
		})
	}
	for _, tt := range []struct {
		name, dir, key string
		want           error
	}{
		{"bare blob with a key", "bare", "file=swtpm-0.7.1/key128.hex", ErrPlaintext},
		{"encrypted without a key", "key128-hex", "", ErrNeedKey},
		{"wrong key", "key128-hex", "pwdfile=swtpm-0.7.1/passphrase.txt,kdf=sha512", ErrAuth},
		{"256-bit key on a 128-bit file", "key128-hex", "file=swtpm-0.7.1/key256.hex,mode=aes-256-cbc", ErrAuth},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := copyFixtureFrom(t, legacyFixtures, tt.dir)
			before, _ := os.ReadFile(filepath.Join(dir, FileName("permall")))
			d := mustOpen(t, dir, Options{Key: fixtureKey(t, fixtureOpt(tt.key))})
			if _, err := d.Load("permall"); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if err := d.Store("permall", []byte("x")); err == nil {
				t.Errorf("Store overwrote the unreadable file")
			}
			if after, _ := os.ReadFile(filepath.Join(dir, FileName("permall"))); !bytes.Equal(before, after) {
				t.Errorf("the file changed")
			}
		})
	}
}

// fixtureOpt makes a legacyCases key option's paths relative to the package directory.
func fixtureOpt(opt string) string {
	if opt == "" {
		return ""
	}
	return string(bytes.ReplaceAll([]byte(opt), []byte("file=swtpm-0.7.1/"), []byte("file=testdata/swtpm-0.7.1/")))
}

// copyFixtureFrom copies fixture directory name under root to a fresh directory.
func copyFixtureFrom(t *testing.T, root, name string) string {
	t.Helper()
	dst := t.TempDir()
	for _, f := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
		b, err := os.ReadFile(filepath.Join(root, name, f))
		if err != nil {
			t.Fatalf("fixture: %v", err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}
