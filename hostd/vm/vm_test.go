package vm

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/swtpm/state"
)

const (
	uuid1  = "5b0c6a1e-8f3d-4c2b-9a7e-1d2f3a4b5c6d"
	secret = "6dd3e4a5-1d76-44ce-961f-f119f5aad935"
)

type env struct {
	m    *Manager
	lv   *fakeLibvirt
	keys *fakeKeys
	cat  *fileCatalog
	sec  *fileSecrets
	root string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{lv: newFakeLibvirt(), keys: &fakeKeys{provider: "prov-a", primary: 1, known: 1},
		cat: &fileCatalog{path: filepath.Join(root, "catalog.json")}, sec: &fileSecrets{path: filepath.Join(root, "secrets.json")}, root: root}
	m, err := New(Config{Keys: e.keys, Libvirt: e.lv, Catalog: e.cat, Secrets: e.sec,
		VTPMDir: filepath.Join(root, "vtpm"), JournalDir: filepath.Join(root, "journal"),
		SocketDir: "/run/nkp/vtpm", SwtpmRoot: filepath.Join(root, "swtpm")})
	if err != nil {
		t.Fatal(err)
	}
	e.m = m
	return e
}

func (e *env) define(t *testing.T, name, uuid, tpm string) {
	t.Helper()
	if err := e.lv.DefineXML(context.Background(), domainXML(name, uuid, tpm)); err != nil {
		t.Fatal(err)
	}
}

// load reads every blob of a state directory with key (nil: plaintext).
func load(t *testing.T, dir string, key []byte) map[string][]byte {
	t.Helper()
	var k *state.Key
	if key != nil {
		var err error
		if k, err = state.NewKey(key); err != nil {
			t.Fatal(err)
		}
	}
	d, err := state.Open(dir, state.Options{Key: k})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	out := map[string][]byte{}
	for _, n := range state.Names {
		b, err := d.Load(n)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatalf("%s: %s: %v", dir, n, err)
		}
		out[n] = b
	}
	return out
}

func sameBlobs(t *testing.T, got, want map[string][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("blobs %d, want %d", len(got), len(want))
	}
	for n, w := range want {
		if !bytes.Equal(got[n], w) {
			t.Fatalf("blob %s differs (%d bytes, want %d)", n, len(got[n]), len(w))
		}
	}
}

func vtpmKeyBytes(t *testing.T, uuid string, o domxml.Object) []byte {
	t.Helper()
	b, err := kdk.Derive(kdkBytes(o.KDKVersion), kdk.PurposeVTPM, uuid, o.KeyID)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkProtected checks that the domain is nkp's with its vTPM object on KDK version
// v, that the state directory of that key holds want under the derived key, that the
// catalog has the same entry, and that no other state directory or journal is left.
func (e *env) checkProtected(t *testing.T, uuid string, v int, want map[string][]byte) domxml.Object {
	t.Helper()
	d := e.lv.domain(t, uuid)
	o, ok := d.Metadata.Object(domxml.ObjectVTPM)
	if !ok || o.KDKVersion != v || o.KDKID != kdkID(v) || d.Metadata.ProviderID != "prov-a" {
		t.Fatalf("metadata = %+v, want a vTPM on KDK version %d", d.Metadata, v)
	}
	tp, _ := d.TPM()
	if tp == nil || tp.Backend != domxml.BackendExternal || tp.SocketPath != "/run/nkp/vtpm/"+uuid+".sock" {
		t.Fatalf("TPM = %+v", tp)
	}
	sameBlobs(t, load(t, StateDir(e.m.cfg.VTPMDir, uuid, o.KeyID), vtpmKeyBytes(t, uuid, o)), want)
	c, ok := e.cat.get(uuid, domxml.ObjectVTPM)
	if !ok || c.KeyID != o.KeyID || c.KDKID != o.KDKID || c.KDKVersion != v {
		t.Fatalf("catalog = %+v, %v; want key %s", c, ok, o.KeyID)
	}
	ents, _ := os.ReadDir(filepath.Join(e.m.cfg.VTPMDir, uuid))
	if len(ents) != 1 || ents[0].Name() != o.KeyID {
		t.Fatalf("state directories of %s: %v, want only %s", uuid, ents, o.KeyID)
	}
	if _, err := os.Stat(e.m.j.path(uuid)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("journal left: %v", err)
	}
	return o
}

func TestProtectNewVTPM(t *testing.T) {
	e := newEnv(t)
	e.define(t, "new1", uuid1, "")
	v, err := e.m.Protect(context.Background(), "new1")
	if err != nil {
		t.Fatal(err)
	}
	if !v.Protected || len(v.Objects) != 1 || !v.Objects[0].Primary || v.Note != "new vTPM" || v.TPM != "stopped" || len(v.Problems) != 0 {
		t.Fatalf("status = %+v", v)
	}
	o := e.checkProtected(t, uuid1, 1, map[string][]byte{})
	if v.Objects[0].KeyID != o.KeyID {
		t.Fatalf("status key %s, XML key %s", v.Objects[0].KeyID, o.KeyID)
	}
	fi, err := os.Stat(StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID))
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state dir: %v %v", fi, err)
	}
}

// TestAdoptRekeyUnprotect takes a libvirt-managed swtpm state made by the real
// swtpm_setup (plaintext, and encrypted under a libvirt secret as libvirt does), adopts
// it, rekeys it to a new KDK version, and gives it back to libvirt: the TPM's state
// (EK, NV) must be the same bytes at every stage.
func TestAdoptRekeyUnprotect(t *testing.T) {
	for _, encrypted := range []bool{false, true} {
		t.Run(map[bool]string{false: "plaintext", true: "libvirt secret"}[encrypted], func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t)
			tpm := "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"
			var pwd []byte
			if encrypted {
				pwd = []byte("libvirt secret value")
				e.lv.secrets[secret] = pwd
				tpm = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'><encryption secret='" + secret + "'/></backend></tpm>"
			}
			e.define(t, "adopt1", uuid1, tpm)
			libvirtDir := filepath.Join(e.m.cfg.SwtpmRoot, uuid1, "tpm2")
			swtpmSetup(t, libvirtDir, pwd)
			var orig map[string][]byte
			if encrypted {
				k, err := passphraseKey(pwd)
				if err != nil {
					t.Fatal(err)
				}
				orig = load(t, libvirtDir, k.Bytes())
			} else {
				orig = load(t, libvirtDir, nil)
			}
			if len(orig["permall"]) < 1000 {
				t.Fatalf("swtpm_setup's permall is %d bytes", len(orig["permall"]))
			}

			v, err := e.m.Protect(ctx, "adopt1")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(v.Note, "adopted libvirt's swtpm state from "+libvirtDir) {
				t.Fatalf("note %q", v.Note)
			}
			o1 := e.checkProtected(t, uuid1, 1, orig)
			if tp, _ := e.lv.domain(t, uuid1).TPM(); tp.Model != "tpm-tis" {
				t.Fatalf("model %q, want tpm-tis kept", tp.Model)
			}
			if _, err := os.Stat(filepath.Join(libvirtDir, "tpm2-00.permall")); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("libvirt's plaintext copy left after adoption: %v", err)
			}

			// Rotate: version 2 becomes primary.
			e.keys.primary, e.keys.known = 2, 2
			if v, _ := e.m.Status(ctx, "adopt1"); v.Objects[0].Primary {
				t.Fatalf("status after rotation says primary: %+v", v)
			}
			v, err = e.m.Rekey(ctx, "adopt1")
			if err != nil {
				t.Fatal(err)
			}
			o2 := e.checkProtected(t, uuid1, 2, orig)
			if o2.KeyID == o1.KeyID || !v.Objects[0].Primary {
				t.Fatalf("rekey kept key %s / status %+v", o1.KeyID, v)
			}
			v, err = e.m.Rekey(ctx, "adopt1")
			if err != nil || !strings.Contains(v.Note, "nothing to do") {
				t.Fatalf("second rekey: %+v %v", v, err)
			}

			if encrypted {
				if o2.SwtpmSecret != secret {
					t.Fatalf("metadata after adopt and rekey names libvirt secret %q, want %s", o2.SwtpmSecret, secret)
				}
				// The secret gone: unprotect --tpm keep refuses rather than write plaintext.
				delete(e.lv.secrets, secret)
				if _, err := e.m.Unprotect(ctx, "adopt1", ""); err == nil || !strings.Contains(err.Error(), secret) || !strings.Contains(err.Error(), "nothing was changed") {
					t.Fatalf("unprotect without the libvirt secret: %v", err)
				}
				if d := e.lv.domain(t, uuid1); d.Metadata == nil {
					t.Fatal("a refused unprotect changed the domain")
				}
				e.lv.secrets[secret] = pwd
			}
			v, err = e.m.Unprotect(ctx, "adopt1", "")
			if err != nil {
				t.Fatal(err)
			}
			d := e.lv.domain(t, uuid1)
			tp, _ := d.TPM()
			if d.Metadata != nil || tp == nil || tp.Backend != domxml.BackendEmulator || tp.Model != "tpm-tis" || tp.Version != "2.0" || v.Protected {
				t.Fatalf("after unprotect: metadata %+v, TPM %+v, status %+v", d.Metadata, tp, v)
			}
			if encrypted {
				// Encrypted under the same secret, as before protect; no plaintext copy.
				k, _ := passphraseKey(pwd)
				sameBlobs(t, load(t, libvirtDir, k.Bytes()), orig)
				b, _ := os.ReadFile(filepath.Join(libvirtDir, "tpm2-00.permall"))
				if h, _, err := envelope.ParseHeader(b); err != nil || h.Flags&envelope.FlagEncrypted == 0 {
					t.Fatalf("libvirt's state after unprotect is not swtpm-encrypted: %+v %v", h, err)
				}
				if tp.EncryptionSecret != secret || !strings.Contains(v.Note, "under libvirt secret "+secret) {
					t.Fatalf("after unprotect: TPM secret %q, note %q", tp.EncryptionSecret, v.Note)
				}
			} else {
				sameBlobs(t, load(t, libvirtDir, nil), orig)
				if tp.EncryptionSecret != "" || !strings.Contains(v.Note, "UNENCRYPTED") {
					t.Fatalf("after unprotect: TPM secret %q, note %q", tp.EncryptionSecret, v.Note)
				}
			}
			if _, ok := e.cat.get(uuid1, domxml.ObjectVTPM); ok {
				t.Fatal("catalog entry left after unprotect")
			}
			if _, err := os.Stat(filepath.Join(e.m.cfg.VTPMDir, uuid1)); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("nkp state left after unprotect: %v", err)
			}

			// And protect adopts it again.
			if _, err := e.m.Protect(ctx, "adopt1"); err != nil {
				t.Fatal(err)
			}
			e.checkProtected(t, uuid1, 2, orig)
		})
	}
}

func TestUnprotectNone(t *testing.T) {
	e := newEnv(t)
	e.define(t, "n1", uuid1, "")
	if _, err := e.m.Protect(context.Background(), uuid1); err != nil {
		t.Fatal(err)
	}
	v, err := e.m.Unprotect(context.Background(), "n1", vmapi.UnprotectNone)
	if err != nil {
		t.Fatal(err)
	}
	d := e.lv.domain(t, uuid1)
	if d.Metadata != nil || len(d.TPMs) != 0 || v.Note != "the vTPM and its state were removed" {
		t.Fatalf("after unprotect --tpm none: %+v %+v", d, v)
	}
	if _, err := os.Stat(filepath.Join(e.m.cfg.VTPMDir, uuid1)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("state left: %v", err)
	}
}

// TestRefusals: every refusal is a sentence naming the VM (and the key when there is
// one), wraps the error the API translates, and changes nothing.
func TestRefusals(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name  string
		setup func(e *env)
		op    func(e *env) error
		is    error
		want  []string
	}{
		{"protect running", func(e *env) { e.lv.active[uuid1] = true },
			func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrRunning, []string{`vm "r1"`, "virsh shutdown r1"}},
		{"protect unknown", nil,
			func(e *env) error { _, err := e.m.Protect(ctx, "nope"); return err }, ErrNoDomain, []string{`vm "nope"`, "virsh list --all"}},
		{"protect twice", func(e *env) { e.m.Protect(ctx, "r1") },
			func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrAlreadyProtected, []string{`vm "r1"`, "vTPM key ", "nkpctl vm status r1"}},
		{"passthrough TPM", func(e *env) {
			e.lv.DefineXML(ctx, domainXML("r1", uuid1, "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"))
		}, func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrUnsupported, []string{`vm "r1"`, `"passthrough" backend`}},
		{"TPM 1.2", func(e *env) {
			e.lv.DefineXML(ctx, domainXML("r1", uuid1, "<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>"))
		}, func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrUnsupported, []string{`vm "r1"`, "1.2"}},
		{"catalog down", func(e *env) { e.cat.down = true },
			func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrUnavailable, []string{`vm "r1"`, "key ", "nothing was changed"}},
		{"no KDK", func(e *env) { e.keys.primary = 0 },
			func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrUnavailable, []string{`vm "r1"`, "no primary KDK"}},
		{"rekey unprotected", nil,
			func(e *env) error { _, err := e.m.Rekey(ctx, "r1"); return err }, ErrNotProtected, []string{`vm "r1"`, "nkpctl vm protect r1"}},
		{"unprotect unprotected", nil,
			func(e *env) error { _, err := e.m.Unprotect(ctx, "r1", ""); return err }, ErrNotProtected, []string{`vm "r1"`}},
		{"unprotect bad choice", nil,
			func(e *env) error { _, err := e.m.Unprotect(ctx, "r1", "maybe"); return err }, ErrBadArgument, []string{`vm "r1"`, `"keep"`}},
		{"rekey with unknown KDK", func(e *env) { e.m.Protect(ctx, "r1"); e.keys.primary, e.keys.known = 3, 1 },
			func(e *env) error { _, err := e.m.Rekey(ctx, "r1"); return err }, ErrUnavailable, []string{`vm "r1"`, "key ", "KDK version 3"}},
		{"rekey running", func(e *env) { e.m.Protect(ctx, "r1"); e.keys.primary, e.keys.known = 2, 2; e.lv.active[uuid1] = true },
			func(e *env) error { _, err := e.m.Rekey(ctx, "r1"); return err }, ErrRunning, []string{`vm "r1"`, "shut off"}},
		// A transient domain vanishes when it stops: "virsh shutdown" must not be the advice.
		{"protect transient", func(e *env) { e.lv.active[uuid1] = true; e.lv.transient[uuid1] = true },
			func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrUnsupported, []string{`vm "r1"`, "transient", "virsh define r1.xml"}},
		// virsh start resumes a managed save image with the definition it was saved with
		// (the old disk files and keys): changing the definition under it is refused.
		{"protect managed save", func(e *env) { e.lv.saved[uuid1] = true },
			func(e *env) error { _, err := e.m.Protect(ctx, "r1"); return err }, ErrSaved, []string{`vm "r1"`, "managed save image", "virsh managedsave-remove r1"}},
		{"rekey managed save", func(e *env) { e.m.Protect(ctx, "r1"); e.keys.primary, e.keys.known = 2, 2; e.lv.saved[uuid1] = true },
			func(e *env) error {
				_, err := e.m.RekeyWith(ctx, "r1", vmapi.RekeyRequest{Deep: true}, nil)
				return err
			}, ErrSaved, []string{`vm "r1"`, "virsh start r1"}},
		{"unprotect managed save", func(e *env) { e.m.Protect(ctx, "r1"); e.lv.saved[uuid1] = true },
			func(e *env) error { _, err := e.m.Unprotect(ctx, "r1", ""); return err }, ErrSaved, []string{`vm "r1"`, "managed save image"}},
		{"other provider", func(e *env) { e.m.Protect(ctx, "r1"); e.keys.provider = "prov-b" },
			func(e *env) error { _, err := e.m.Unprotect(ctx, "r1", ""); return err }, nil, []string{`vm "r1"`, "provider prov-a", "joined to provider prov-b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.define(t, "r1", uuid1, "")
			if tt.setup != nil {
				tt.setup(e)
			}
			before := e.lv.domain(t, uuid1)
			beforeCat, _ := e.cat.get(uuid1, domxml.ObjectVTPM)
			defines := e.lv.defines
			err := tt.op(e)
			if err == nil {
				t.Fatal("no error")
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("error %v does not wrap %v", err, tt.is)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if e.lv.defines != defines {
				t.Errorf("the domain was redefined")
			}
			if after := e.lv.domain(t, uuid1); !equalMeta(after.Metadata, before.Metadata) {
				t.Errorf("metadata changed: %+v -> %+v", before.Metadata, after.Metadata)
			}
			e.cat.down = false
			if err := e.m.Recover(ctx); err != nil {
				t.Fatalf("Recover: %v", err)
			}
			if c, _ := e.cat.get(uuid1, domxml.ObjectVTPM); c != beforeCat {
				t.Errorf("catalog changed: %+v -> %+v", beforeCat, c)
			}
			if _, err := os.Stat(e.m.j.path(uuid1)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("journal left behind: %v", err)
			}
			o, _ := before.Metadata.Object(domxml.ObjectVTPM)
			ents, _ := os.ReadDir(filepath.Join(e.m.cfg.VTPMDir, uuid1))
			if o.KeyID == "" && len(ents) != 0 || o.KeyID != "" && (len(ents) != 1 || ents[0].Name() != o.KeyID) {
				t.Errorf("state directories %v, want only %q", ents, o.KeyID)
			}
		})
	}
}

func equalMeta(a, b *domxml.Metadata) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.ProviderID == b.ProviderID && slicesEqual(a.Objects, b.Objects)
}

func slicesEqual(a, b []domxml.Object) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestStatusRunning(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "s1", uuid1, "")
	if _, err := e.m.Protect(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	e.lv.active[uuid1] = true
	v, err := e.m.Status(ctx, "s1")
	if err != nil || v.TPM != "ok" || !v.Running || len(v.Problems) != 0 {
		t.Fatalf("running, TPM answering: %+v %v", v, err)
	}
	// Present (QEMU has the device) but the vTPM does not answer its probe.
	var probed []string
	e.m.cfg.ProbeVTPM = func(_ context.Context, u string) error {
		probed = append(probed, u)
		return errors.New("vTPM of " + u + ": no answer: i/o timeout")
	}
	v, err = e.m.Status(ctx, "s1")
	if err != nil || !strings.Contains(v.TPM, "not answering") || !strings.Contains(v.TPM, "i/o timeout") || len(v.Problems) != 1 || len(probed) != 1 || probed[0] != uuid1 {
		t.Fatalf("running, vTPM silent: %+v %v (probed %v)", v, err, probed)
	}
	e.m.cfg.ProbeVTPM = func(context.Context, string) error { return nil }
	if v, err = e.m.Status(ctx, "s1"); err != nil || v.TPM != "ok" {
		t.Fatalf("running, vTPM answering its probe: %+v %v", v, err)
	}
	e.lv.tpmErr = errors.New("query-tpm: no TPM device")
	v, err = e.m.Status(ctx, "s1")
	if err != nil || !strings.Contains(v.TPM, "no TPM device") || len(v.Problems) != 1 || !strings.Contains(v.Problems[0], v.Objects[0].KeyID) {
		t.Fatalf("running, TPM silent: %+v %v", v, err)
	}
	e.define(t, "plain", "5b0c6a1e-8f3d-4c2b-9a7e-000000000001", "")
	l, err := e.m.List(ctx)
	if err != nil || len(l) != 1 || l[0].Domain != "s1" {
		t.Fatalf("List = %+v, %v; want only the protected s1", l, err)
	}
}

func TestPassphraseKeyMatchesSwtpm(t *testing.T) {
	// A state encrypted by swtpm_setup with --pwdfile and aes-256-cbc (what libvirt
	// does with a secret) must open with passphraseKey of the same passphrase and not
	// with another.
	dir := t.TempDir()
	swtpmSetup(t, dir, []byte("pw-1"))
	k, err := passphraseKey([]byte("pw-1"))
	if err != nil {
		t.Fatal(err)
	}
	if b := load(t, dir, k.Bytes()); len(b["permall"]) == 0 {
		t.Fatal("no permall")
	}
	bad, _ := passphraseKey([]byte("pw-2"))
	d, err := state.Open(dir, state.Options{Key: bad})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.Load("permall"); !errors.Is(err, state.ErrAuth) {
		t.Fatalf("wrong passphrase: %v, want ErrAuth", err)
	}
}

// TestOwner: the vTPM state written at adoption and rekey belongs to the vTPM user
// (nkp-swtpm runs unprivileged), directories 0700 and files 0600, and the state handed
// back to libvirt at unprotect belongs to libvirt's swtpm user. The <vm-uuid> directory
// above each stays root's, 0711: were it the unprivileged user's, a compromised vTPM
// could swap the state directory for a symlink while root writes and chowns in it.
func TestOwner(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to chown")
	}
	ctx := context.Background()
	e := newEnv(t)
	e.m.cfg.VTPMOwner = &Owner{UID: 65534, GID: 65534}
	e.m.cfg.SwtpmOwner = &Owner{UID: 65533, GID: 65533}
	e.define(t, "o1", uuid1, "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>")
	swtpmSetup(t, filepath.Join(e.m.cfg.SwtpmRoot, uuid1, "tpm2"), nil)
	for _, step := range []struct {
		name  string
		do    func() error
		root  string
		owner uint32
	}{
		{"protect", func() error { _, err := e.m.Protect(ctx, "o1"); return err }, e.m.cfg.VTPMDir, 65534},
		{"rekey", func() error {
			e.keys.primary, e.keys.known = 2, 2
			_, err := e.m.Rekey(ctx, "o1")
			return err
		}, e.m.cfg.VTPMDir, 65534},
		{"unprotect", func() error { _, err := e.m.Unprotect(ctx, "o1", ""); return err }, e.m.cfg.SwtpmRoot, 65533},
	} {
		if err := step.do(); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		parent := filepath.Join(step.root, uuid1)
		fi, err := os.Lstat(parent)
		if err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 || fi.Mode().Perm() != 0o711 {
			t.Errorf("%s: %s: owner %d:%d mode %v, want 0:0 0711", step.name, parent, st.Uid, st.Gid, fi.Mode().Perm())
		}
		n := 0
		err = filepath.WalkDir(parent, func(p string, de fs.DirEntry, err error) error {
			if err != nil || p == parent {
				return err
			}
			fi, err := os.Lstat(p)
			if err != nil {
				return err
			}
			st := fi.Sys().(*syscall.Stat_t)
			want := fs.FileMode(0o600)
			if de.IsDir() {
				want = 0o700
			}
			if st.Uid != step.owner || st.Gid != step.owner || (fi.Mode().Perm() != want && de.Name() != ".lock") {
				t.Errorf("%s: %s: owner %d:%d mode %v, want %d:%d %v", step.name, p, st.Uid, st.Gid, fi.Mode().Perm(), step.owner, step.owner, want)
			}
			n++
			return nil
		})
		if err != nil || n < 2 { // the state directory and at least its permall
			t.Fatalf("%s: walked %d entries: %v", step.name, n, err)
		}
	}
}

// TestUnprotectNeverStarted: a vTPM that never ran has no state; unprotect --tpm keep
// gives libvirt an emulator TPM and leaves the state directory for libvirt to create.
func TestUnprotectNeverStarted(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "ns1", uuid1, "")
	if _, err := e.m.Protect(ctx, "ns1"); err != nil {
		t.Fatal(err)
	}
	v, err := e.m.Unprotect(ctx, "ns1", vmapi.UnprotectKeep)
	if err != nil {
		t.Fatal(err)
	}
	tp, _ := e.lv.domain(t, uuid1).TPM()
	if tp == nil || tp.Backend != domxml.BackendEmulator || !strings.Contains(v.Note, "no state yet") {
		t.Fatalf("TPM %+v, note %q", tp, v.Note)
	}
	if _, err := os.Stat(filepath.Join(e.m.cfg.SwtpmRoot, uuid1)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("an empty libvirt state directory was made: %v", err)
	}
}

// TestRekeyCatalogDown: the provider is down during a rekey. The rekey takes effect (the
// catalog is updated after the commit), its answer says what is left, and Recover
// finishes it once the provider answers.
func TestRekeyCatalogDown(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "cd1", uuid1, "")
	if _, err := e.m.Protect(ctx, "cd1"); err != nil {
		t.Fatal(err)
	}
	e.keys.primary, e.keys.known = 2, 2
	e.cat.down = true
	v, err := e.m.Rekey(ctx, "cd1")
	if err != nil {
		t.Fatal(err)
	}
	if v.Objects[0].KDKVersion != 2 || len(v.Problems) != 1 || !strings.Contains(v.Problems[0], "finishing it failed") {
		t.Fatalf("rekey with the provider down: %+v", v)
	}
	if c, _ := e.cat.get(uuid1, domxml.ObjectVTPM); c.KDKVersion != 1 {
		t.Fatalf("catalog %+v, want still version 1 (provider down)", c)
	}
	if s, _ := e.m.Status(ctx, "cd1"); len(s.Problems) != 1 || !strings.Contains(s.Problems[0], "interrupted rekey") {
		t.Fatalf("status: %+v", s)
	}
	e.cat.down = false
	if err := e.m.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	e.checkProtected(t, uuid1, 2, map[string][]byte{})
}

// TestMigratedVM: a VM protected on another host runs here now (migrated or restored),
// so the provider's catalog still gives its objects to that host and refuses this one's
// changes (not_owner). Rekey and unprotect take the objects over (MoveVM) and go on.
func TestMigratedVM(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "mig1", uuid1, "")
	if _, err := e.m.Protect(ctx, "mig1"); err != nil {
		t.Fatal(err)
	}
	e.cat.foreign = map[string]bool{uuid1: true}
	e.keys.primary, e.keys.known = 2, 2
	v, err := e.m.Rekey(ctx, "mig1")
	if err != nil || len(v.Problems) != 0 {
		t.Fatalf("rekey of a VM whose catalog objects another host owns: %+v, %v", v, err)
	}
	if e.cat.moves != 1 {
		t.Fatalf("MoveVM called %d times, want 1", e.cat.moves)
	}
	e.checkProtected(t, uuid1, 2, map[string][]byte{})

	e.cat.foreign = map[string]bool{uuid1: true}
	if _, err := e.m.Unprotect(ctx, "mig1", "none"); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.cat.get(uuid1, domxml.ObjectVTPM); ok || e.cat.moves != 2 {
		t.Fatalf("after unprotect: catalog entry left %v, moves %d (want none, 2)", ok, e.cat.moves)
	}
}

// TestRemoveDoesNotFollowLinks: the vTPM state directory belongs to the unprivileged vTPM
// user, who may plant symbolic links in it; when hostd (root) removes the directory
// after unprotect --tpm none, what the links point at stays.
func TestRemoveDoesNotFollowLinks(t *testing.T) {
	e := newEnv(t)
	e.define(t, "l1", uuid1, "")
	if _, err := e.m.Protect(context.Background(), "l1"); err != nil {
		t.Fatal(err)
	}
	d := e.lv.domain(t, uuid1)
	o, _ := d.Metadata.Object(domxml.ObjectVTPM)
	dir := StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID)
	outside := t.TempDir()
	victim := filepath.Join(outside, "precious")
	if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{"dirlink": outside, "filelink": victim, "tpm2-00.volatilestate": victim} {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.m.Unprotect(context.Background(), "l1", vmapi.UnprotectNone); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("state directory left: %v", err)
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "keep" {
		t.Fatalf("the file a planted link named: %q, %v", b, err)
	}
}

// TestOrphanedState: nkp's metadata removed from a protected domain (virsh edit, or
// virsh define of an older XML), then the domain undefined: status names the vTPM state
// nkp still keeps, and what to do, instead of calling the domain "not protected".
func TestOrphanedState(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "r1", uuid1, "")
	if _, err := e.m.Protect(ctx, "r1"); err != nil {
		t.Fatal(err)
	}
	o, _ := e.lv.domain(t, uuid1).Metadata.Object(domxml.ObjectVTPM)
	dir := filepath.Join(e.m.cfg.VTPMDir, uuid1)
	if v, err := e.m.Status(ctx, "r1"); err != nil || len(v.Problems) != 0 {
		t.Fatalf("protected domain: %+v %v", v.Problems, err)
	}
	x, err := e.lv.DomainXML(ctx, uuid1)
	if err != nil {
		t.Fatal(err)
	}
	// The metadata's key-id edited: its state is here under the old key.
	edited := bytes.Replace(x, []byte(o.KeyID), []byte("11111111-2222-4333-8444-555555555555"), 1)
	if err := e.lv.DefineXML(ctx, edited); err != nil {
		t.Fatal(err)
	}
	v, err := e.m.Status(ctx, "r1")
	if err != nil || len(v.Problems) != 1 || !strings.Contains(v.Problems[0], "under key "+o.KeyID) || !strings.Contains(v.Problems[0], `key-id="`+o.KeyID+`" back with virsh edit r1`) {
		t.Fatalf("key-id edited: %q %v", v.Problems, err)
	}
	if err := e.lv.DefineXML(ctx, x); err != nil {
		t.Fatal(err)
	}
	plain, err := domxml.SetMetadata(x, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.lv.DefineXML(ctx, plain); err != nil {
		t.Fatal(err)
	}
	says := func(what string, problems []string, want ...string) {
		t.Helper()
		if len(problems) != 1 {
			t.Fatalf("%s: problems %q, want one", what, problems)
		}
		for _, w := range want {
			if !strings.Contains(problems[0], w) {
				t.Errorf("%s: %q does not say %q", what, problems[0], w)
			}
		}
	}
	v, err = e.m.Status(ctx, "r1")
	if err != nil {
		t.Fatal(err)
	}
	says("metadata removed", v.Problems, o.KeyID, dir, "names no nkp vTPM", "virsh edit r1", "nkpctl provider objects")
	list, err := e.m.List(ctx)
	if err != nil || len(list) != 1 || list[0].Domain != "r1" {
		t.Fatalf("List: %+v %v; want r1 with its problem", list, err)
	}
	e.lv.mu.Lock()
	delete(e.lv.doms, uuid1)
	e.lv.mu.Unlock()
	if list, err = e.m.List(ctx); err != nil || len(list) != 1 || list[0].UUID != uuid1 {
		t.Fatalf("List after undefine: %+v %v", list, err)
	}
	says("undefined", list[0].Problems, "libvirt defines no domain "+uuid1, o.KeyID, "virsh undefine", dir, "nkpctl vm forget "+uuid1, "provider's catalog")
	if v, err = e.m.Status(ctx, uuid1); err != nil {
		t.Fatalf("Status by UUID of the undefined domain: %v", err)
	}
	says("undefined, by UUID", v.Problems, "libvirt defines no domain "+uuid1)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	// The state removed by hand: the catalog still holds the object (removing nkp's
	// metadata with virsh define did not unregister it), so the record keeps the VM
	// listed, with the command that clears it.
	if list, err = e.m.List(ctx); err != nil || len(list) != 1 || list[0].UUID != uuid1 {
		t.Fatalf("List after the state was removed: %+v %v", list, err)
	}
	says("only the record left", list[0].Problems, "nkpctl vm forget r1", "vtpm (key ", "provider's catalog")
	if _, err := e.m.Forget(ctx, "r1", true); err != nil {
		t.Fatal(err)
	}
	if list, err = e.m.List(ctx); err != nil || len(list) != 0 {
		t.Fatalf("List after forget: %+v %v", list, err)
	}
}

// TestJournalUnwritable: nkp-hostd's state directory full or read-only (here a read-only
// bind mount of the journal directory): protect is refused before anything changes,
// naming the directory and what it needs.
func TestJournalUnwritable(t *testing.T) {
	e := newEnv(t)
	e.define(t, "r1", uuid1, "")
	dir := e.m.cfg.JournalDir
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Skipf("bind mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Skipf("read-only remount: %v", err)
	}
	_, err := e.m.Protect(context.Background(), "r1")
	if err == nil {
		t.Fatal("protect without a journal")
	}
	for _, w := range []string{`vm "r1"`, "journal", dir, "must be writable and have free space", "nothing was changed"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
	if d := e.lv.domain(t, uuid1); d.Metadata != nil || e.lv.defines != 1 {
		t.Fatalf("the domain changed: %+v, %d defines", d.Metadata, e.lv.defines)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.m.cfg.VTPMDir, uuid1)); len(ents) != 0 {
		t.Fatalf("state directories left: %v", ents)
	}
}

// TestRecoverSetupLeftovers: staging directories of a new vTPM's manufacture that a killed
// hostd left are removed at the next start, with a VM directory that held nothing else;
// a VM directory with state keeps its state.
func TestRecoverSetupLeftovers(t *testing.T) {
	e := newEnv(t)
	onlySetup := filepath.Join(e.m.cfg.VTPMDir, "1b9cd8a4-8b9f-4c7e-9a55-3e6c1f2d0a11")
	withState := filepath.Join(e.m.cfg.VTPMDir, "2c8ab7e1-6d4f-4b3a-8e22-5f7a9c0b1d22")
	for _, d := range []string{
		filepath.Join(onlySetup, ".setup-0123456789abcdef"),
		filepath.Join(withState, ".setup-fedcba9876543210"),
		filepath.Join(withState, "k-state"),
	} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "tpm2-00.permall"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.m.Recover(context.Background()); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if _, err := os.Stat(onlySetup); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("VM directory holding only a setup leftover kept: %v", err)
	}
	ents, err := os.ReadDir(withState)
	if err != nil || len(ents) != 1 || ents[0].Name() != "k-state" {
		t.Errorf("VM directory with state: %v, %v; want only k-state", ents, err)
	}
}
