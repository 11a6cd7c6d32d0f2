package kdkcache

import (
	"bytes"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm-tools/simulator"
	"google.golang.org/protobuf/proto"

	"github.com/nkp-dev/nkp/hostd/hosttpm"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/kdk"
)

func openSim(t *testing.T) *hosttpm.TPM {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("TPM simulator: %v", err)
	}
	tpm, err := hosttpm.New(sim, sim)
	if err != nil {
		sim.Close()
		t.Fatal(err)
	}
	return tpm
}

// wrap makes the provider's import blob of key for tpm's EK.
func wrap(t *testing.T, tpm *hosttpm.TPM, key []byte) []byte {
	t.Helper()
	der, err := tpm.EKPublic()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := server.CreateImportBlob(pub, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := proto.Marshal(blob)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func k(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func TestTPMCache(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kdk")
	tpm := openSim(t)
	id1, id2 := kdk.NewKeyID(), kdk.NewKeyID()
	c, err := Open(dir, tpm, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Key(1); !errors.Is(err, ErrUnknownVersion) {
		t.Fatalf("Key on an empty cache: %v", err)
	}
	ch, err := c.Update(apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id1, Version: 1, Primary: true, ImportBlob: wrap(t, tpm, k(1))}}})
	if err != nil || len(ch.Added) != 1 || ch.Primary != 1 {
		t.Fatalf("Update = %+v, %v", ch, err)
	}
	got, id, err := c.Key(1)
	if err != nil || !bytes.Equal(got, k(1)) || id != id1 {
		t.Fatalf("Key(1) = %x %s %v", got, id, err)
	}
	// On disk: only the blob, 0600 in a 0700 directory.
	fi, _ := os.Stat(dir)
	raw, err := os.ReadFile(filepath.Join(dir, "v1.json"))
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("cache dir %v, file %v", fi.Mode(), err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, "v1.json")); fi.Mode().Perm() != 0o600 {
		t.Errorf("blob file mode %v, want 0600", fi.Mode())
	}
	if bytes.Contains(raw, k(1)) {
		t.Error("the KDK is on disk in the clear")
	}

	// Rotation: v2 becomes primary; the same release again changes nothing.
	rel := apiv1.ReleaseResponse{KDKs: []apiv1.KDK{
		{ID: id1, Version: 1, ImportBlob: wrap(t, tpm, k(1))},
		{ID: id2, Version: 2, Primary: true, ImportBlob: wrap(t, tpm, k(2))},
	}}
	if ch, err := c.Update(rel); err != nil || len(ch.Added) != 1 || ch.Added[0] != 2 || ch.Primary != 2 {
		t.Fatalf("rotation Update = %+v, %v", ch, err)
	}
	if ch, err := c.Update(rel); err != nil || len(ch.Added)+len(ch.Removed) != 0 {
		t.Fatalf("repeated Update = %+v, %v", ch, err)
	}
	if p, ok := c.Primary(); !ok || p.Version != 2 {
		t.Errorf("Primary = %+v", p)
	}

	// A restart with the provider unreachable: the blobs unwrap again.
	c.Close()
	c, err = Open(dir, tpm, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := c.Key(2); err != nil || !bytes.Equal(got, k(2)) {
		t.Fatalf("Key(2) after reopen = %x, %v", got, err)
	}
	if vs := c.Versions(); len(vs) != 2 || !vs[1].Primary || vs[0].Primary {
		t.Errorf("Versions after reopen = %+v", vs)
	}

	// Retirement: v1 no longer released.
	if ch, err := c.Update(apiv1.ReleaseResponse{KDKs: rel.KDKs[1:]}); err != nil || len(ch.Removed) != 1 || ch.Removed[0] != 1 {
		t.Fatalf("retire Update = %+v, %v", ch, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "v1.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("retired blob still on disk: %v", err)
	}
	if _, _, err := c.Key(1); !errors.Is(err, ErrUnknownVersion) {
		t.Errorf("Key(1) after retirement: %v", err)
	}
	// A bare key to a TPM host is refused.
	if _, err := c.Update(apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id2, Version: 2, Primary: true, Bare: k(2)}}}); !errors.Is(err, ErrNeedTPM) {
		t.Errorf("bare release to a TPM cache: %v", err)
	}
	// Junk in the directory is ignored, leftovers of a cut write removed.
	os.WriteFile(filepath.Join(dir, "v9.json"), []byte("{"), 0o600)
	os.WriteFile(filepath.Join(dir, ".tmp-v3.json-1"), []byte("x"), 0o600)
	c.Close()
	c, err = Open(dir, tpm, nil)
	if err != nil || len(c.Versions()) != 1 {
		t.Fatalf("Open with junk: %+v, %v", c.Versions(), err)
	}
	if _, err := os.Stat(filepath.Join(dir, ".tmp-v3.json-1")); !errors.Is(err, os.ErrNotExist) {
		t.Error("temp file left")
	}
	blobFor1 := wrap(t, tpm, k(1))
	tpm.Close()

	// Another host's TPM: the cached blob does not unwrap; Key says so, and a release
	// made for the first TPM is refused with a sentence.
	other := openSim(t)
	defer other.Close()
	c2, err := Open(dir, other, nil)
	if err != nil {
		t.Fatal(err)
	}
	vs := c2.Versions()
	if len(vs) != 1 || vs[0].Err == "" {
		t.Fatalf("Versions with another TPM = %+v, want an error", vs)
	}
	if _, _, err := c2.Key(2); !errors.Is(err, ErrUnusable) {
		t.Errorf("Key with another TPM: %v", err)
	}
	_, err = c2.Update(apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id1, Version: 1, Primary: true, ImportBlob: blobFor1}}})
	if err == nil || !strings.Contains(err.Error(), "another TPM") {
		t.Errorf("Update with a foreign blob: %v", err)
	}
	// Revocation: everything goes.
	if err := c2.Forget(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("Forget left %v", ents)
	}
}

func TestMemoryCache(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kdk")
	c, err := Open(dir, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Persistent() {
		t.Error("memory cache says persistent")
	}
	id := kdk.NewKeyID()
	rel := apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id, Version: 3, Primary: true, Bare: k(3)}}}
	if _, err := c.Update(rel); err != nil {
		t.Fatal(err)
	}
	// The release's bare key is wiped (the cache keeps its own copy), on the first
	// release, on a repeated one and on a refused one.
	if !bytes.Equal(rel.KDKs[0].Bare, make([]byte, kdk.Size)) {
		t.Errorf("Update left the release's bare KDK in place: %x", rel.KDKs[0].Bare)
	}
	again := apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id, Version: 3, Primary: true, Bare: k(3)}}}
	refused := apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id, Version: 3, Primary: true, Bare: k(3)}, {ID: "x", Version: 5, Bare: k(5)}}}
	if _, err := c.Update(again); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Update(refused); err == nil {
		t.Fatal("Update accepted a KDK with id \"x\"")
	}
	for _, r := range []apiv1.ReleaseResponse{again, refused} {
		for _, x := range r.KDKs {
			if !bytes.Equal(x.Bare, make([]byte, kdk.Size)) {
				t.Errorf("Update left bare KDK version %d in the release: %x", x.Version, x.Bare)
			}
		}
	}
	if got, _, err := c.Key(3); err != nil || !bytes.Equal(got, k(3)) {
		t.Fatalf("Key(3) = %x, %v", got, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("memory cache wrote to disk: %v", err)
	}
	if _, err := c.Update(apiv1.ReleaseResponse{KDKs: []apiv1.KDK{{ID: id, Version: 3, ImportBlob: []byte{1}}}}); !errors.Is(err, ErrNoTPM) {
		t.Errorf("import blob to a memory cache: %v", err)
	}
	for _, bad := range []apiv1.KDK{{ID: "x", Version: 1, Bare: k(1)}, {ID: id, Version: 0, Bare: k(1)}, {ID: id, Version: 4, Bare: k(1)[:16]}} {
		if _, err := c.Update(apiv1.ReleaseResponse{KDKs: []apiv1.KDK{bad}}); err == nil {
			t.Errorf("Update accepted %+v", bad)
		}
	}
	c.Close()
	if _, _, err := c.Key(3); !errors.Is(err, ErrUnknownVersion) {
		t.Errorf("Key after Close: %v", err)
	}
}
