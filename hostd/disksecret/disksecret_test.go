package disksecret

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/hostd/virt"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// fakeLibvirt keeps domains and secrets in memory and counts calls.
type fakeLibvirt struct {
	mu        sync.Mutex
	domains   map[string]virt.Definition
	secrets   map[string]fakeSecret
	calls     int
	defines   int
	refuse    map[string]error // secret UUID → DefineSecret fails
	listErr   error
	undefined []string
}

type fakeSecret struct {
	desc  string
	value string
}

func newFakeLibvirt() *fakeLibvirt {
	return &fakeLibvirt{domains: map[string]virt.Definition{}, secrets: map[string]fakeSecret{}, refuse: map[string]error{}}
}

func (f *fakeLibvirt) Definitions(context.Context) ([]virt.Definition, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	var out []virt.Definition
	for _, d := range f.domains {
		out = append(out, d)
	}
	return out, nil
}

func (f *fakeLibvirt) Definition(_ context.Context, uuid string) (virt.Definition, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	d, ok := f.domains[uuid]
	return d, ok, nil
}

func (f *fakeLibvirt) DefineSecret(_ context.Context, s virt.Secret, value []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if err := f.refuse[s.UUID]; err != nil {
		return err
	}
	if !strings.HasPrefix(s.Description, virt.SecretPrefix) {
		return fmt.Errorf("description %q", s.Description)
	}
	f.defines++
	f.secrets[s.UUID] = fakeSecret{desc: s.Description, value: string(value)}
	return nil
}

func (f *fakeLibvirt) UndefineSecret(_ context.Context, uuid string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	delete(f.secrets, uuid)
	f.undefined = append(f.undefined, uuid)
	return nil
}

func (f *fakeLibvirt) ListSecrets(context.Context) ([]virt.SecretInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.listErr != nil {
		return nil, f.listErr
	}
	var out []virt.SecretInfo
	for u, s := range f.secrets {
		out = append(out, virt.SecretInfo{UUID: u, Description: s.desc, Ephemeral: true, Private: true})
	}
	return out, nil
}

func (f *fakeLibvirt) SecretExists(_ context.Context, uuid string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	_, ok := f.secrets[uuid]
	return ok, nil
}

func (f *fakeLibvirt) value(uuid string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.secrets[uuid]
	return s.value, ok
}

func (f *fakeLibvirt) count() (calls, defines int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls, f.defines
}

func (f *fakeLibvirt) set(d virt.Definition) {
	f.mu.Lock()
	f.domains[d.UUID] = d
	f.mu.Unlock()
}

func (f *fakeLibvirt) drop(uuid string) {
	f.mu.Lock()
	delete(f.domains, uuid)
	f.mu.Unlock()
}

// restart forgets every secret, as libvirtd does with ephemeral ones.
func (f *fakeLibvirt) restart() {
	f.mu.Lock()
	f.secrets = map[string]fakeSecret{}
	f.mu.Unlock()
}

// fakeKeys derives sha256(vm|keyID|version) for the versions it holds.
type fakeKeys struct{ held map[int]bool }

func (k fakeKeys) DiskKey(_ context.Context, vmUUID string, o domxml.Object) ([]byte, error) {
	if !k.held[o.KDKVersion] {
		return nil, fmt.Errorf("KDK version %d: %w", o.KDKVersion, kdkcache.ErrUnknownVersion)
	}
	s := sha256.Sum256([]byte(fmt.Sprintf("%s|%s|%d", vmUUID, o.KeyID, o.KDKVersion)))
	return s[:], nil
}

func passFor(vmUUID string, o domxml.Object) string {
	s := sha256.Sum256([]byte(fmt.Sprintf("%s|%s|%d", vmUUID, o.KeyID, o.KDKVersion)))
	return hex.EncodeToString(s[:])
}

// fakeVerifier opens an image when the passphrase is the one recorded for its path.
type fakeVerifier struct {
	mu     sync.Mutex
	images map[string]string // path → passphrase it opens under ("" = cannot tell)
	calls  int
}

func (v *fakeVerifier) Opens(_ context.Context, path, format string, pass []byte) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	want, ok := v.images[path]
	switch {
	case !ok || want == "":
		return errors.New("image locked")
	case want != string(pass):
		return fmt.Errorf("%s: %w", path, ErrWrongKey)
	}
	return nil
}

type vmSpec struct {
	name, uuid string
	objs       []domxml.Object
}

func newSpec(name string, versions ...int) vmSpec {
	v := vmSpec{name: name, uuid: kdk.NewKeyID()}
	v.objs = append(v.objs, domxml.Object{Name: domxml.ObjectVTPM, KeyID: kdk.NewKeyID(), KDKID: kdk.NewKeyID(), KDKVersion: 1})
	for i, ver := range versions {
		v.objs = append(v.objs, domxml.Object{Name: fmt.Sprintf("disk:vd%c", 'a'+i), KeyID: kdk.NewKeyID(), KDKID: kdk.NewKeyID(), KDKVersion: ver})
	}
	return v
}

func (v vmSpec) xml(t testing.TB) []byte {
	t.Helper()
	base := fmt.Sprintf("<domain type='qemu'><name>%s</name><uuid>%s</uuid><memory>1024</memory><devices/></domain>", v.name, v.uuid)
	doc, err := domxml.SetMetadata([]byte(base), &domxml.Metadata{ProviderID: kdk.NewKeyID(), Objects: v.objs})
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func (v vmSpec) disks() []domxml.Object { return DiskObjects(&domxml.Metadata{Objects: v.objs}) }

func (v vmSpec) def(t testing.TB) virt.Definition {
	return virt.Definition{UUID: v.uuid, Name: v.name, Inactive: v.xml(t)}
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newManager(t *testing.T, lv *fakeLibvirt, held ...int) (*Manager, *clock) {
	t.Helper()
	h := map[int]bool{}
	for _, v := range held {
		h[v] = true
	}
	c := &clock{t: time.Date(2026, 12, 6, 22, 0, 0, 0, time.UTC)}
	m, err := New(Config{Libvirt: lv, Keys: fakeKeys{h}, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	return m, c
}

func mustReconcile(t *testing.T, m *Manager) {
	t.Helper()
	if err := m.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestReconcileDefines(t *testing.T) {
	lv := newFakeLibvirt()
	m, _ := newManager(t, lv, 1, 2)
	a := newSpec("a", 1, 2) // two disks, both held
	b := newSpec("b", 3)    // KDK v3 not held
	c := newSpec("c")       // vTPM only
	for _, v := range []vmSpec{a, b, c} {
		lv.set(v.def(t))
	}
	stale := domxml.SecretUUID(kdk.NewKeyID(), kdk.NewKeyID())
	lv.secrets[stale] = fakeSecret{desc: "nkp: disk vda of VM gone (x), key y", value: "old"}
	mustReconcile(t, m)

	for _, o := range a.disks() {
		u := domxml.SecretUUID(a.uuid, o.KeyID)
		got, ok := lv.value(u)
		if !ok || got != passFor(a.uuid, o) {
			t.Errorf("secret of a %s: %q, %v; want the hex of its derived key", o.Name, got, ok)
		}
		if d := lv.secrets[u].desc; d != Description("a", a.uuid, o) || !strings.Contains(d, o.KeyID) {
			t.Errorf("description %q", d)
		}
	}
	if len(lv.secrets) != 2 {
		t.Errorf("libvirt holds %d secrets, want a's 2 (b's KDK version is not held, c has no disk, the stale one removed)", len(lv.secrets))
	}
	if !slices.Contains(lv.undefined, stale) {
		t.Error("the stale nkp secret was not undefined")
	}
	if nr := m.Check(a.uuid, a.disks()); nr != nil {
		t.Errorf("Check(a) = %v", nr)
	}
	nr := m.Check(b.uuid, b.disks())
	if nr == nil || nr.Reason != NoKey || !errors.Is(nr.Err, kdkcache.ErrUnknownVersion) || nr.Target != "vda" {
		t.Fatalf("Check(b) = %+v, want NoKey for vda", nr)
	}
	if s := nr.Error(); !strings.Contains(s, b.disks()[0].KeyID) || !strings.Contains(s, "KDK v3") {
		t.Errorf("NotReady sentence %q names neither key nor KDK version", s)
	}
	if st := m.Stats(); st.Defined != 2 || st.ReconcileErrors != 0 {
		t.Errorf("Stats = %+v", st)
	}

	// A second reconcile with nothing changed defines nothing again.
	_, before := lv.count()
	mustReconcile(t, m)
	if _, after := lv.count(); after != before {
		t.Errorf("an unchanged reconcile defined %d secrets again", after-before)
	}
}

func TestCheck(t *testing.T) {
	a := newSpec("a", 1)
	o := a.disks()[0]
	other := o
	other.KeyID = kdk.NewKeyID()
	tests := []struct {
		name  string
		setup func(t *testing.T, lv *fakeLibvirt, m *Manager)
		disks []domxml.Object
		want  Reason // 0: ready
	}{
		{"defined", func(t *testing.T, lv *fakeLibvirt, m *Manager) { mustReconcile(t, m) }, a.disks(), 0},
		{"never defined", func(*testing.T, *fakeLibvirt, *Manager) {}, a.disks(), Pending},
		{"another key ID than defined", func(t *testing.T, lv *fakeLibvirt, m *Manager) { mustReconcile(t, m) }, []domxml.Object{other}, Pending},
		{"libvirt disconnected", func(t *testing.T, lv *fakeLibvirt, m *Manager) { mustReconcile(t, m); m.Disconnected() }, a.disks(), Pending},
		{"secret changed by another process", func(t *testing.T, lv *fakeLibvirt, m *Manager) {
			mustReconcile(t, m)
			m.SecretEvent(domxml.SecretUUID(a.uuid, o.KeyID))
		}, a.disks(), Pending},
		{"libvirt refuses the secret", func(t *testing.T, lv *fakeLibvirt, m *Manager) {
			lv.refuse[domxml.SecretUUID(a.uuid, o.KeyID)] = errors.New("secret driver broken")
			if err := m.Reconcile(context.Background()); err == nil {
				t.Error("reconcile passed while libvirt refused a secret")
			}
			if m.Stats().ReconcileErrors != 1 {
				t.Errorf("reconcile errors %d", m.Stats().ReconcileErrors)
			}
		}, a.disks(), DefineError},
		{"no disks", func(*testing.T, *fakeLibvirt, *Manager) {}, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lv := newFakeLibvirt()
			lv.set(a.def(t))
			m, _ := newManager(t, lv, 1)
			tt.setup(t, lv, m)
			calls, _ := lv.count()
			nr := m.Check(a.uuid, tt.disks)
			if after, _ := lv.count(); after != calls {
				t.Errorf("Check called libvirt %d times", after-calls)
			}
			switch {
			case tt.want == 0 && nr != nil:
				t.Errorf("Check = %v, want ready", nr)
			case tt.want != 0 && (nr == nil || nr.Reason != tt.want):
				t.Errorf("Check = %+v, want reason %d", nr, tt.want)
			}
		})
	}
}

// TestRestart: libvirtd restarts (ephemeral secrets gone); Disconnected, then the
// reconcile after the reconnection defines them again.
func TestRestart(t *testing.T) {
	lv := newFakeLibvirt()
	a := newSpec("a", 1)
	lv.set(a.def(t))
	m, _ := newManager(t, lv, 1)
	mustReconcile(t, m)
	lv.restart()
	m.Disconnected()
	if nr := m.Check(a.uuid, a.disks()); nr == nil || nr.Reason != Pending {
		t.Fatalf("Check after a disconnection = %v, want Pending", nr)
	}
	mustReconcile(t, m)
	if _, ok := lv.value(domxml.SecretUUID(a.uuid, a.disks()[0].KeyID)); !ok {
		t.Fatal("secret not defined again after the restart")
	}
	if nr := m.Check(a.uuid, a.disks()); nr != nil {
		t.Fatalf("Check = %v", nr)
	}
	// Lost without a Disconnected (an event dropped): the listing shows it missing.
	lv.restart()
	mustReconcile(t, m)
	if _, ok := lv.value(domxml.SecretUUID(a.uuid, a.disks()[0].KeyID)); !ok {
		t.Fatal("a secret libvirt lost was not defined again")
	}
}

// TestEnsureRemove: the operations' secrets are kept until Remove, or until a domain
// uses them; a rekey of a running VM keeps both keys' secrets while it runs.
func TestEnsureRemove(t *testing.T) {
	ctx := context.Background()
	lv := newFakeLibvirt()
	m, _ := newManager(t, lv, 1, 2)
	plain := newSpec("p") // being protected: the XML does not reference the disk yet
	lv.set(plain.def(t))
	prot := plain
	prot.objs = append(slices.Clone(plain.objs), domxml.Object{Name: "disk:vda", KeyID: kdk.NewKeyID(), KDKID: kdk.NewKeyID(), KDKVersion: 1})
	if err := m.Ensure(ctx, plain.uuid, prot.disks()); err != nil {
		t.Fatal(err)
	}
	u := domxml.SecretUUID(plain.uuid, prot.disks()[0].KeyID)
	if got, ok := lv.value(u); !ok || got != passFor(plain.uuid, prot.disks()[0]) {
		t.Fatal("Ensure did not define the secret")
	}
	if !strings.Contains(lv.secrets[u].desc, "VM p ") {
		t.Errorf("Ensure's description %q lacks the VM's name", lv.secrets[u].desc)
	}
	mustReconcile(t, m)
	if _, ok := lv.value(u); !ok {
		t.Fatal("a reconcile removed a secret Ensure defined before the XML switch")
	}
	// The XML switches; the domain now uses it (unpinned from here on).
	lv.set(prot.def(t))
	mustReconcile(t, m)
	// Shallow rekey while running: live XML keeps the old key, persistent has the new.
	rekeyed := prot
	rekeyed.objs = slices.Clone(prot.objs)
	rekeyed.objs[1] = domxml.Object{Name: "disk:vda", KeyID: kdk.NewKeyID(), KDKID: kdk.NewKeyID(), KDKVersion: 2}
	if err := m.Ensure(ctx, prot.uuid, rekeyed.disks()); err != nil {
		t.Fatal(err)
	}
	u2 := domxml.SecretUUID(prot.uuid, rekeyed.disks()[0].KeyID)
	lv.set(virt.Definition{UUID: prot.uuid, Name: "p", Active: true, Inactive: rekeyed.xml(t), Live: prot.xml(t)})
	mustReconcile(t, m)
	for _, s := range []string{u, u2} {
		if _, ok := lv.value(s); !ok {
			t.Fatalf("secret %s gone while the running VM uses the old key and its definition the new", s)
		}
	}
	// The VM stops: the old key's secret is no longer used.
	lv.set(virt.Definition{UUID: prot.uuid, Name: "p", Inactive: rekeyed.xml(t)})
	if err := m.ReconcileVM(ctx, prot.uuid); err != nil {
		t.Fatal(err)
	}
	if _, ok := lv.value(u); ok {
		t.Error("the old key's secret is still defined after the VM stopped")
	}
	// Unprotect: Remove, then the XML loses the object.
	if err := m.Remove(ctx, prot.uuid, rekeyed.disks()); err != nil {
		t.Fatal(err)
	}
	if _, ok := lv.value(u2); ok {
		t.Error("Remove left the secret")
	}
	if nr := m.Check(prot.uuid, rekeyed.disks()); nr == nil {
		t.Error("Check is ready after Remove")
	}
	if err := m.Remove(ctx, prot.uuid, rekeyed.disks()); err != nil {
		t.Errorf("Remove of secrets already gone: %v", err)
	}
	// Ensure without the key: an error naming the disk.
	missing := []domxml.Object{{Name: "disk:vdb", KeyID: kdk.NewKeyID(), KDKID: kdk.NewKeyID(), KDKVersion: 9}}
	if err := m.Ensure(ctx, prot.uuid, missing); err == nil || !strings.Contains(err.Error(), "vdb") {
		t.Errorf("Ensure with an unknown KDK version: %v", err)
	}
}

// TestKickAndEvents: a hook's Kick defines from its XML through Run; an undefined
// domain's secrets go; another process's change is repaired.
func TestKickAndEvents(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lv := newFakeLibvirt()
	m, clk := newManager(t, lv, 1)
	go m.Run(ctx)
	a := newSpec("incoming", 1) // an incoming migration: libvirt does not know it yet
	u := domxml.SecretUUID(a.uuid, a.disks()[0].KeyID)
	waitReady := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for m.Check(a.uuid, a.disks()) != nil {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not ready within 10 s: %v", what, m.Check(a.uuid, a.disks()))
			}
			time.Sleep(time.Millisecond)
		}
	}
	m.Kick(a.uuid, a.name, a.disks(), a.xml(t))
	waitReady("kick")
	mustReconcile(t, m)
	if _, ok := lv.value(u); !ok {
		t.Fatal("a reconcile within the grace removed a kicked secret")
	}
	// Someone else sets another value: defined again with the right one.
	lv.mu.Lock()
	lv.secrets[u] = fakeSecret{desc: lv.secrets[u].desc, value: "wrong"}
	lv.mu.Unlock()
	m.SecretEvent(u)
	waitReady("after another process's change")
	if got, _ := lv.value(u); got != passFor(a.uuid, a.disks()[0]) {
		t.Fatalf("value after repair %q", got)
	}
	// After the grace, with no domain using it, it goes.
	clk.add(KickGrace + time.Second)
	mustReconcile(t, m)
	if _, ok := lv.value(u); ok {
		t.Fatal("a kicked secret no domain uses survived the grace")
	}
	// Defined, then undefined: RequestVM follows each event.
	lv.set(a.def(t))
	m.RequestVM(a.uuid)
	waitReady("defined event")
	lv.drop(a.uuid)
	m.RequestVM(a.uuid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := lv.value(u); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("secret of an undefined domain not removed within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
	if m.Check(a.uuid, a.disks()) == nil {
		t.Error("Check ready for an undefined domain's removed secret")
	}
}

// TestVerify: an image that does not open under its key is named by Check; verdicts are
// cached by path, size and mtime.
func TestVerify(t *testing.T) {
	dir := t.TempDir()
	good, bad, busy := dir+"/good.qcow2", dir+"/bad.qcow2", dir+"/busy.qcow2"
	for _, p := range []string{good, bad, busy} {
		if err := writeFile(p); err != nil {
			t.Fatal(err)
		}
	}
	a := newSpec("a", 1, 1, 1)
	ds := a.disks()
	paths := map[string]string{"vda": good, "vdb": bad, "vdc": busy}
	ver := &fakeVerifier{images: map[string]string{good: passFor(a.uuid, ds[0]), bad: passFor(a.uuid, ds[0]), busy: ""}}
	lv := newFakeLibvirt()
	lv.set(a.def(t))
	m, err := New(Config{Libvirt: lv, Keys: fakeKeys{map[int]bool{1: true}}, Verify: ver,
		Disks: func(_ []byte, target, secret string) (string, string) {
			if secret != domxml.SecretUUID(a.uuid, ds[0].KeyID) && secret != domxml.SecretUUID(a.uuid, ds[1].KeyID) && secret != domxml.SecretUUID(a.uuid, ds[2].KeyID) {
				t.Errorf("Disks asked with secret %s", secret)
			}
			return paths[target], "qcow2"
		}})
	if err != nil {
		t.Fatal(err)
	}
	mustReconcile(t, m)
	if ver.calls != 0 {
		t.Errorf("the verifier ran %d times inside the reconcile; it runs in the background", ver.calls)
	}
	if nr := m.Check(a.uuid, ds[1:2]); nr != nil {
		t.Errorf("refused before verification: %v", nr)
	}
	m.verifyQueued(context.Background())
	if nr := m.Check(a.uuid, ds[:1]); nr != nil {
		t.Errorf("good image: %v", nr)
	}
	nr := m.Check(a.uuid, ds[1:2])
	if nr == nil || nr.Reason != WrongKey || nr.Path != bad || !strings.Contains(nr.Error(), ds[1].KeyID) || !strings.Contains(nr.Error(), bad) {
		t.Errorf("image made under another key: %+v", nr)
	}
	if nr := m.Check(a.uuid, ds[2:]); nr != nil {
		t.Errorf("an image that cannot be checked (in use) is not refused: %v", nr)
	}
	calls := ver.calls
	lv.restart()
	mustReconcile(t, m) // defines all three again: good and bad from the cache
	m.verifyQueued(context.Background())
	if nr := m.Check(a.uuid, ds[1:2]); nr == nil || nr.Reason != WrongKey {
		t.Errorf("after a redefinition the cached verdict is lost: %+v", nr)
	}
	if ver.calls != calls+1 {
		t.Errorf("redefinition ran the verifier %d times, want 1 (only the image it could not judge)", ver.calls-calls)
	}
}

func writeFile(p string) error { return os.WriteFile(p, []byte("image"), 0o600) }

// TestForget: a revoked host's Forget undefines every nkp secret (this manager's and
// ones it never knew) and Check refuses afterwards.
func TestForget(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lv := newFakeLibvirt()
	a := newSpec("a", 1, 1)
	lv.set(a.def(t))
	m, _ := newManager(t, lv, 1)
	mustReconcile(t, m)
	lv.secrets[domxml.SecretUUID(kdk.NewKeyID(), kdk.NewKeyID())] = fakeSecret{desc: "nkp: disk vda of VM x (y), key z"}
	go m.Run(ctx)
	m.RequestForget()
	deadline := time.Now().Add(10 * time.Second)
	for {
		lv.mu.Lock()
		n := len(lv.secrets)
		lv.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d secrets left 10 s after RequestForget", n)
		}
		time.Sleep(time.Millisecond)
	}
	if nr := m.Check(a.uuid, a.disks()); nr == nil {
		t.Error("Check ready after Forget")
	}
	if m.Stats().Defined != 0 {
		t.Errorf("Stats after Forget: %+v", m.Stats())
	}
}

// BenchmarkCheck: the hook's answer for a VM with 4 disks on a host with 50 such VMs,
// from 50 goroutines at once (go test -bench Check -cpu 1,2 ./hostd/disksecret).
func BenchmarkCheck(b *testing.B) {
	lv := newFakeLibvirt()
	t := &testing.T{}
	var vms []vmSpec
	for i := range 50 {
		v := newSpec(fmt.Sprintf("vm%d", i), 1, 1, 1, 1)
		lv.set(v.def(t))
		vms = append(vms, v)
	}
	m, err := New(Config{Libvirt: lv, Keys: fakeKeys{map[int]bool{1: true}}})
	if err != nil {
		b.Fatal(err)
	}
	if err := m.Reconcile(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.SetParallelism(25)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			v := vms[i%len(vms)]
			if nr := m.Check(v.uuid, v.disks()); nr != nil {
				b.Error(nr)
			}
			i++
		}
	})
}

// imageSetup is a manager whose VM a has one disk (vda) with its image at path, verified:
// it opens under its key.
func imageSetup(t testing.TB, path string) (*Manager, *fakeVerifier, vmSpec, func(string, string) (string, string)) {
	m, ver, a, image := imageManager(t, path)
	if ver.calls != 1 || m.Check(a.uuid, a.disks()) != nil {
		t.Fatalf("setup: %d verifications, Check %v; want one, ready", ver.calls, m.Check(a.uuid, a.disks()))
	}
	return m, ver, a, image
}

// imageManager is imageSetup without its checks.
func imageManager(t testing.TB, path string) (*Manager, *fakeVerifier, vmSpec, func(string, string) (string, string)) {
	a := newSpec("a", 1)
	ver := &fakeVerifier{images: map[string]string{path: passFor(a.uuid, a.disks()[0])}}
	lv := newFakeLibvirt()
	lv.set(a.def(t))
	m, err := New(Config{Libvirt: lv, Keys: fakeKeys{map[int]bool{1: true}}, Verify: ver,
		Disks: func([]byte, string, string) (string, string) { return path, "qcow2" }})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.verifyQueued(context.Background())
	return m, ver, a, func(string, string) (string, string) { return path, "qcow2" }
}

// TestCheckImagesSwapped: the hook's CheckImages notices an image file replaced under a
// defined disk secret after it was verified (another file renamed over it, copied over it
// in place, or rewritten with the same size and its mtime set back: only ctime tells),
// verifies it again inline and refuses naming the disk, key and path; Check (memory)
// says the same from then on; an unchanged file costs no verification; putting back an
// image the key opens makes the disk ready again.
func TestCheckImagesSwapped(t *testing.T) {
	swaps := []struct {
		name string
		swap func(t *testing.T, path string)
	}{
		{"renamed over", func(t *testing.T, path string) {
			if err := os.WriteFile(path+".other", []byte("another VM's image"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(path+".other", path); err != nil {
				t.Fatal(err)
			}
		}},
		{"copied over in place", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("a plain image, longer"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"same size, mtime set back", func(t *testing.T, path string) {
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(10 * time.Millisecond) // a ctime tick apart (not synchronisation)
			if err := os.WriteFile(path, bytes.Repeat([]byte{'x'}, int(fi.Size())), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, sw := range swaps {
		t.Run(sw.name, func(t *testing.T) {
			ctx := context.Background()
			path := t.TempDir() + "/a.qcow2"
			if err := writeFile(path); err != nil {
				t.Fatal(err)
			}
			m, ver, a, image := imageSetup(t, path)
			ds := a.disks()
			if nr := m.CheckImages(ctx, a.uuid, a.name, ds, image); nr != nil || ver.calls != 1 {
				t.Fatalf("unchanged image: %v, %d verifications; want ready, no new verification", nr, ver.calls-1)
			}
			sw.swap(t, path)
			ver.mu.Lock()
			ver.images[path] = "another key's passphrase"
			ver.mu.Unlock()
			nr := m.CheckImages(ctx, a.uuid, a.name, ds, image)
			if nr == nil || nr.Reason != WrongKey || nr.Path != path || !strings.Contains(nr.Error(), ds[0].KeyID) || !strings.Contains(nr.Error(), path) || !strings.Contains(nr.Error(), "disk vda") {
				t.Fatalf("swapped image: %+v; want WrongKey naming vda, key %s and %s", nr, ds[0].KeyID, path)
			}
			if ver.calls != 2 {
				t.Errorf("swapped image verified %d times, want once", ver.calls-1)
			}
			if nr := m.Check(a.uuid, ds); nr == nil || nr.Reason != WrongKey {
				t.Errorf("Check after the inline verification: %+v; want WrongKey", nr)
			}
			if nr := m.CheckImages(ctx, a.uuid, a.name, ds, image); nr == nil || nr.Reason != WrongKey || ver.calls != 2 {
				t.Errorf("swapped image asked again: %+v after %d verifications; want WrongKey from memory", nr, ver.calls-1)
			}
			// The right image put back.
			if err := os.WriteFile(path+".good", []byte("the image back"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(path+".good", path); err != nil {
				t.Fatal(err)
			}
			ver.mu.Lock()
			ver.images[path] = passFor(a.uuid, ds[0])
			ver.mu.Unlock()
			if nr := m.CheckImages(ctx, a.uuid, a.name, ds, image); nr != nil {
				t.Errorf("image put back: %v", nr)
			}
			if nr := m.Check(a.uuid, ds); nr != nil {
				t.Errorf("Check after the image was put back: %v", nr)
			}
		})
	}
}

// TestCheckImagesNotVerified: an image never verified (it appeared after its secret was
// defined) and a missing one are left to the background verification and to QEMU: the
// hook does not verify them.
func TestCheckImagesNotVerified(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/late.qcow2"
	m, ver, a, image := imageManager(t, path) // no file yet: nothing verified
	if err := writeFile(path); err != nil {
		t.Fatal(err)
	}
	if nr := m.CheckImages(context.Background(), a.uuid, a.name, a.disks(), image); nr != nil || ver.calls != 0 {
		t.Errorf("never verified image: %v, %d verifications in the hook; want none", nr, ver.calls)
	}
	os.Remove(path)
	if nr := m.CheckImages(context.Background(), a.uuid, a.name, a.disks(), image); nr != nil {
		t.Errorf("missing image: %v", nr)
	}
}

// BenchmarkCheckImagesUnchanged is the hook's cost per disk for an image unchanged since
// it was verified (a stat and a map look-up), beside BenchmarkStat, a bare stat of the
// same file: the two should be within noise of each other.
func BenchmarkCheckImagesUnchanged(b *testing.B) {
	path := b.TempDir() + "/a.qcow2"
	if err := writeFile(path); err != nil {
		b.Fatal(err)
	}
	m, ver, a, image := imageSetup(b, path)
	ds := a.disks()
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if nr := m.CheckImages(ctx, a.uuid, a.name, ds, image); nr != nil {
			b.Fatal(nr)
		}
	}
	if ver.calls != 1 {
		b.Fatalf("%d verifications of an unchanged image", ver.calls-1)
	}
}

// BenchmarkStat is one stat of an image file: BenchmarkCheckImagesUnchanged's floor.
func BenchmarkStat(b *testing.B) {
	path := b.TempDir() + "/a.qcow2"
	if err := writeFile(path); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := os.Stat(path); err != nil {
			b.Fatal(err)
		}
	}
}
