package vm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/qemuimg"
)

// virshLibvirt is Libvirt through the virsh command, for tests against the real
// libvirtd while hostd's own libvirt adapter is not there.
type virshLibvirt struct{ tmp string }

func (v virshLibvirt) run(ctx context.Context, args ...string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", "qemu:///system"}, args...)...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "failed to get domain") || strings.Contains(msg, "Domain not found") {
			return nil, fmt.Errorf("%s: %w", msg, ErrNoDomain)
		}
		return nil, fmt.Errorf("virsh %s: %w: %s", args[0], err, msg)
	}
	return out, nil
}

func (v virshLibvirt) DomainXML(ctx context.Context, d string) ([]byte, error) {
	return v.run(ctx, "dumpxml", "--inactive", "--security-info", d)
}

func (v virshLibvirt) DefineXML(ctx context.Context, x []byte) error {
	f, err := os.CreateTemp(v.tmp, "define-*.xml")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(x); err != nil {
		f.Close()
		return err
	}
	f.Close()
	_, err = v.run(ctx, "define", f.Name())
	return err
}

// Lifecycle reads the State, Persistent and Managed save lines of virsh dominfo.
func (v virshLibvirt) Lifecycle(ctx context.Context, d string) (Lifecycle, error) {
	out, err := v.run(ctx, "dominfo", d)
	if err != nil {
		return Lifecycle{}, err
	}
	info := map[string]string{}
	for _, l := range strings.Split(string(out), "\n") {
		if k, val, ok := strings.Cut(l, ":"); ok {
			info[strings.TrimSpace(k)] = strings.TrimSpace(val)
		}
	}
	for _, k := range []string{"State", "Persistent", "Managed save"} {
		if _, ok := info[k]; !ok {
			return Lifecycle{}, fmt.Errorf("virsh dominfo %s: no %q line", d, k)
		}
	}
	return Lifecycle{Active: info["State"] != "shut off", Persistent: info["Persistent"] == "yes", ManagedSave: info["Managed save"] == "yes"}, nil
}

func (v virshLibvirt) Domains(ctx context.Context) ([]string, error) {
	out, err := v.run(ctx, "list", "--all", "--uuid")
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

func (v virshLibvirt) SecretValue(ctx context.Context, u string) ([]byte, error) {
	out, err := v.run(ctx, "secret-get-value", u)
	if err != nil {
		return nil, err
	}
	return base64.StdEncoding.DecodeString(strings.TrimSpace(string(out)))
}

func (v virshLibvirt) TPMCheck(ctx context.Context, d string) error {
	out, err := v.run(ctx, "qemu-monitor-command", d, `{"execute":"query-tpm"}`)
	if err != nil {
		return err
	}
	if !bytes.Contains(out, []byte(`"model"`)) {
		return fmt.Errorf("QEMU reports no TPM device: %s", out)
	}
	return nil
}

func (v virshLibvirt) DiskEncryption(ctx context.Context, d string) (map[string]bool, error) {
	x, err := v.run(ctx, "dumpxml", d)
	if err != nil {
		return nil, err
	}
	out, err := v.run(ctx, "qemu-monitor-command", d, `{"execute":"query-block"}`)
	if err != nil {
		return nil, err
	}
	return BlockEncrypted(x, out)
}

func needLibvirt(t *testing.T) {
	t.Helper()
	if err := exec.Command("virsh", "-q", "-c", "qemu:///system", "version").Run(); err != nil {
		if os.Getenv("NKP_E2E") == "required" {
			t.Fatalf("libvirtd not reachable and NKP_E2E=required: run test/setup.sh (%v)", err)
		}
		t.Skipf("libvirtd not reachable (%v); run test/setup.sh", err)
	}
}

// crashConfig is a Manager's configuration shared by the parent test and its children
// (everything file-backed or in libvirtd, so a child's crash leaves it for the parent).
func crashConfig(root string, primary int) (Config, *fileCatalog) {
	cat := &fileCatalog{path: filepath.Join(root, "catalog.json")}
	return Config{
		Keys:    &fakeKeys{provider: "prov-a", primary: primary, known: primary},
		Libvirt: virshLibvirt{tmp: root}, Catalog: cat, Secrets: &fileSecrets{path: filepath.Join(root, "secrets.json")},
		VTPMDir: filepath.Join(root, "vtpm"), JournalDir: filepath.Join(root, "journal"),
		SocketDir: "/run/nkp/vtpm", SwtpmRoot: filepath.Join(root, "swtpm"),
	}, cat
}

// TestCrashChild is the process the crash tests kill: it runs one operation and sends
// itself SIGKILL right after the named step.
func TestCrashChild(t *testing.T) {
	root := os.Getenv("NKP_VM_CRASH_ROOT")
	if root == "" {
		t.Skip("run by TestCrash")
	}
	primary, _ := strconv.Atoi(os.Getenv("NKP_VM_CRASH_PRIMARY"))
	cfg, _ := crashConfig(root, primary)
	op, step := os.Getenv("NKP_VM_CRASH_OP"), os.Getenv("NKP_VM_CRASH_STEP")
	cfg.AfterStep = func(o, s string) {
		if o == op && s == step {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dom := os.Getenv("NKP_VM_CRASH_DOMAIN")
	ctx := context.Background()
	switch op {
	case opProtect:
		_, err = m.Protect(ctx, dom)
	case opRekey:
		_, err = m.RekeyWith(ctx, dom, vmapi.RekeyRequest{Deep: os.Getenv("NKP_VM_CRASH_DEEP") != ""}, nil)
	case opUnprotect:
		_, err = m.Unprotect(ctx, dom, "keep")
	case opForget:
		_, err = m.Forget(ctx, dom, true)
	}
	t.Fatalf("step %s/%s never reached (err %v)", op, step, err)
}

// TestCrash kills a process running protect (adopting a libvirt swtpm state made by
// swtpm_setup), rekey or unprotect right after each journaled step (including the
// catalog update and the cleanup that follow the commit), against the real
// libvirtd. Before any recovery the domain must already be bootable: its definition
// names keys (or libvirt's swtpm) whose state is complete on disk. Then Recover must
// settle it: journal gone, catalog equal to the definition, no state left over.
func TestCrash(t *testing.T) {
	needLibvirt(t)
	seed := t.TempDir()
	swtpmSetup(t, seed, nil)
	orig := load(t, seed, nil)

	cases := []struct {
		op        string
		step      string
		committed bool
	}{
		{opProtect, "journal", false}, {opProtect, "staged", false}, {opProtect, "registered", false},
		{opProtect, "defined", true}, {opProtect, "catalog", true}, {opProtect, "cleaned", true},
		{opRekey, "journal", false}, {opRekey, "staged", false},
		{opRekey, "defined", true}, {opRekey, "catalog", true}, {opRekey, "cleaned", true},
		{opUnprotect, "journal", false}, {opUnprotect, "staged", false},
		{opUnprotect, "defined", true}, {opUnprotect, "catalog", true}, {opUnprotect, "cleaned", true},
	}
	for _, c := range cases {
		t.Run(c.op+"/"+c.step, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			var r [4]byte
			rand.Read(r[:])
			name := "hostdvm-crash-" + hex.EncodeToString(r[:])
			u := uuid.NewString()
			lv := virshLibvirt{tmp: root}
			t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "undefine", name).Run() })
			if err := lv.DefineXML(ctx, domainXML(name, u, "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>")); err != nil {
				t.Fatal(err)
			}
			libvirtDir := filepath.Join(root, "swtpm", u, "tpm2")
			copyDir(t, seed, libvirtDir)

			primary := 1
			if c.op != opProtect {
				cfg, _ := crashConfig(root, 1)
				m, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := m.Protect(ctx, name); err != nil {
					t.Fatal(err)
				}
				if c.op == opRekey {
					primary = 2
				}
			}
			before, _ := domxml.Parse(must(lv.DomainXML(ctx, u)))
			oldObj, _ := before.Metadata.Object(domxml.ObjectVTPM)

			cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
			cmd.Env = append(os.Environ(), "NKP_VM_CRASH_ROOT="+root, "NKP_VM_CRASH_DOMAIN="+name,
				"NKP_VM_CRASH_OP="+c.op, "NKP_VM_CRASH_STEP="+c.step, "NKP_VM_CRASH_PRIMARY="+strconv.Itoa(primary))
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child was not killed at %s/%s: %v\n%s", c.op, c.step, err, out)
			}

			// Before recovery: bootable with the old keys or the new ones.
			d, err := domxml.Parse(must(lv.DomainXML(ctx, u)))
			if err != nil {
				t.Fatal(err)
			}
			cur, protected := d.Metadata.Object(domxml.ObjectVTPM)
			tp, _ := d.TPM()
			if protected {
				if tp == nil || tp.Backend != domxml.BackendExternal {
					t.Fatalf("metadata with key %s but TPM %+v", cur.KeyID, tp)
				}
				sameBlobs(t, load(t, StateDir(filepath.Join(root, "vtpm"), u, cur.KeyID), vtpmKeyBytes(t, u, cur)), orig)
			} else {
				if tp == nil || tp.Backend != domxml.BackendEmulator {
					t.Fatalf("no metadata and TPM %+v", tp)
				}
				sameBlobs(t, load(t, libvirtDir, nil), orig)
			}
			isNew := map[string]bool{
				opProtect:   protected,
				opRekey:     cur.KeyID != oldObj.KeyID,
				opUnprotect: !protected,
			}[c.op]
			if isNew != c.committed {
				t.Fatalf("after %s/%s the domain has the new keys: %v, want %v", c.op, c.step, isNew, c.committed)
			}

			m, cat := recoverAsAtStart(t, ctx, root, primary, u)
			ents, _ := os.ReadDir(filepath.Join(root, "vtpm", u))
			catObj, inCat := cat.get(u, domxml.ObjectVTPM)
			if protected {
				if len(ents) != 1 || ents[0].Name() != cur.KeyID {
					t.Fatalf("state directories %v, want only %s", ents, cur.KeyID)
				}
				if !inCat || catObj.KeyID != cur.KeyID || catObj.KDKVersion != cur.KDKVersion {
					t.Fatalf("catalog %+v (%v), want key %s", catObj, inCat, cur.KeyID)
				}
				if _, err := os.Stat(filepath.Join(libvirtDir, "tpm2-00.permall")); c.op == opProtect && c.committed && !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("libvirt's adopted copy left: %v", err)
				}
			} else {
				if len(ents) != 0 || inCat {
					t.Fatalf("unprotected, but state directories %v and catalog %+v (%v) left", ents, catObj, inCat)
				}
				sameBlobs(t, load(t, libvirtDir, nil), orig)
				if _, err := os.Stat(libvirtDir + ".nkp-new"); !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("staging left: %v", err)
				}
			}
			// And the VM can be operated on again.
			if protected {
				_, err = m.Unprotect(ctx, name, "keep")
			} else {
				_, err = m.Protect(ctx, name)
			}
			if err != nil {
				t.Fatalf("next operation after recovery: %v", err)
			}
		})
	}
}

// TestCrashForget kills a process running forget of a protected VM undefined in the real
// libvirtd (with a kept original file) right after each journaled step. Whatever the
// step, hostd's start finishes it: catalog entry, vTPM state, kept file and journal all
// gone; before that, a catalog entry is never gone while the journal that finishes the
// job is missing.
func TestCrashForget(t *testing.T) {
	needLibvirt(t)
	for _, step := range []string{"journal", "catalog", "secrets", "kept", "state"} {
		t.Run(step, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			var r [4]byte
			rand.Read(r[:])
			name := "hostdvm-forget-" + hex.EncodeToString(r[:])
			u := uuid.NewString()
			lv := virshLibvirt{tmp: root}
			t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "undefine", name).Run() })
			if err := lv.DefineXML(ctx, domainXML(name, u, "")); err != nil {
				t.Fatal(err)
			}
			cfg, cat := crashConfig(root, 1)
			m, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := m.Protect(ctx, name); err != nil {
				t.Fatal(err)
			}
			orig := filepath.Join(root, "orig.img")
			if err := os.WriteFile(orig, []byte("plaintext"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := m.keep(u, kept{Target: "vda", Path: orig, Op: opProtect, VM: name}); err != nil {
				t.Fatal(err)
			}
			if _, err := lv.run(ctx, "undefine", name); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
			cmd.Env = append(os.Environ(), "NKP_VM_CRASH_ROOT="+root, "NKP_VM_CRASH_DOMAIN="+name,
				"NKP_VM_CRASH_OP="+opForget, "NKP_VM_CRASH_STEP="+step, "NKP_VM_CRASH_PRIMARY=1")
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child was not killed at forget/%s: %v\n%s", step, err, out)
			}
			_, inCat := cat.get(u, domxml.ObjectVTPM)
			if _, err := os.Stat(filepath.Join(root, "journal", u+".json")); err != nil && !inCat {
				t.Fatalf("killed at %s: the catalog entry is gone but no journal finishes the forget (%v)", step, err)
			}
			recoverAsAtStart(t, ctx, root, 1, u)
			_, inCat = cat.get(u, domxml.ObjectVTPM)
			_, serr := os.Stat(filepath.Join(root, "vtpm", u))
			_, kerr := os.Stat(orig)
			if inCat || !errors.Is(serr, fs.ErrNotExist) || !errors.Is(kerr, fs.ErrNotExist) {
				t.Fatalf("after recovery: catalog entry %v, state %v, kept file %v; want all gone", inCat, serr, kerr)
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCrashDisks kills a process running protect, rekey (shallow and --deep) and
// unprotect of a domain with a raw disk and a qcow2 disk on a backing chain right after
// each step (real qemu-img, real libvirtd). Before recovery every disk the domain names
// opens with the key its metadata names (its secret defined) and reads the guest's data;
// the domain has the new disks exactly when the crash came after the define. Recover then
// leaves the catalog and the secrets equal to the definition, one keyslot per image, and
// no file that is neither used nor kept for finalize; and the VM can be operated again.
func TestCrashDisks(t *testing.T) {
	needLibvirt(t)
	type tc struct {
		op, step  string
		deep      bool
		committed bool
	}
	// The steps where what is on disk differs (each run costs ~20 qemu-img calls, so not
	// every step of every operation: the ones between are equivalent for recovery).
	cases := []tc{
		{opProtect, "journal", false, false}, {opProtect, "disk-converted", false, false},
		{opProtect, "secrets", false, false}, {opProtect, "registered", false, false},
		{opProtect, "defined", false, true}, {opProtect, "disk-catalog", false, true},
		{opRekey, "disk-slot-added", false, false}, {opRekey, "secrets", false, false},
		{opRekey, "defined", false, true}, {opRekey, "disk-slot-removed", false, true},
		{opRekey, "disk-verified", true, false}, {opRekey, "defined", true, true},
		{opUnprotect, "disk-created", false, false}, {opUnprotect, "defined", false, true},
		{opUnprotect, "disk-catalog", false, true},
	}
	seed := t.TempDir()
	diskImages(t, seed)
	qi := &qemuimg.Tool{}
	for _, c := range cases {
		name := c.op + "/" + c.step
		if c.deep {
			name = "rekey-deep/" + c.step
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			dir := filepath.Join(root, "disks")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"vda.img", "vdb.qcow2", "base.qcow2", "want-vda", "want-vdb"} {
				if out, err := exec.Command("cp", "--sparse=always", filepath.Join(seed, f), dir).CombinedOutput(); err != nil {
					t.Fatalf("cp: %v %s", err, out)
				}
			}
			// vdb's backing file is named by its absolute path: point it at the copy.
			if err := exec.Command("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "vdb.qcow2")).Run(); err != nil {
				t.Fatal(err)
			}
			var r [4]byte
			rand.Read(r[:])
			dom := "hostdvm-crashdisk-" + hex.EncodeToString(r[:])
			u := uuid.NewString()
			lv := virshLibvirt{tmp: root}
			t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "undefine", dom).Run() })
			if err := lv.DefineXML(ctx, domainXML(dom, u, diskDevices(dir))); err != nil {
				t.Fatal(err)
			}
			primary := 1
			if c.op != opProtect {
				cfg, _ := crashConfig(root, 1)
				m, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := m.Protect(ctx, dom); err != nil {
					t.Fatal(err)
				}
				if c.op == opRekey && !c.deep {
					primary = 2
				}
			}
			before, _ := domxml.Parse(must(lv.DomainXML(ctx, u)))

			cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
			cmd.Env = append(os.Environ(), "NKP_VM_CRASH_ROOT="+root, "NKP_VM_CRASH_DOMAIN="+dom,
				"NKP_VM_CRASH_OP="+c.op, "NKP_VM_CRASH_STEP="+c.step, "NKP_VM_CRASH_PRIMARY="+strconv.Itoa(primary))
			if c.deep {
				cmd.Env = append(cmd.Env, "NKP_VM_CRASH_DEEP=1")
			}
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child was not killed at %s: %v\n%s", name, err, out)
			}
			sec := &fileSecrets{path: filepath.Join(root, "secrets.json")}

			// Before recovery: every disk opens as the definition says and reads the data.
			bootable := func(stage string) *domxml.Domain {
				t.Helper()
				d, err := domxml.Parse(must(lv.DomainXML(ctx, u)))
				if err != nil {
					t.Fatal(err)
				}
				for _, target := range []string{"vda", "vdb"} {
					dk, _ := d.Disk(target)
					want := qemuimg.Image{Path: filepath.Join(dir, "want-"+target), Format: qemuimg.Raw}
					o, ok := d.Metadata.Object(domxml.DiskObject(target))
					f, _ := imgFormat(dk.DriverType, ok)
					img := qemuimg.Image{Path: dk.Source, Format: f}
					if ok {
						img.Key = diskKeyBytes(t, u, o)
						if !slices.Contains(sec.defined(), u+"/"+o.KeyID) {
							t.Fatalf("%s: disk %s names key %s, whose secret is not defined", stage, target, o.KeyID)
						}
						if dk.Encryption == nil || dk.Encryption.SecretUUID != domxml.SecretUUID(u, o.KeyID) {
							t.Fatalf("%s: disk %s: <encryption> %+v does not match key %s", stage, target, dk.Encryption, o.KeyID)
						}
					}
					if err := qi.Compare(ctx, img, want); err != nil {
						t.Fatalf("%s: disk %s (%s): %v", stage, target, dk.Source, err)
					}
				}
				return d
			}
			d := bootable("before recovery")
			changed := false
			for _, target := range []string{"vda", "vdb"} {
				o1, _ := before.Metadata.Object(domxml.DiskObject(target))
				o2, _ := d.Metadata.Object(domxml.DiskObject(target))
				if o1.KeyID != o2.KeyID {
					changed = true
				}
			}
			if changed != c.committed {
				t.Fatalf("after %s the domain has the new disks: %v, want %v", name, changed, c.committed)
			}

			m, cat := recoverAsAtStart(t, ctx, root, primary, u)
			d = bootable("after recovery")
			var wantSecrets []string
			used := map[string]bool{"base.qcow2": true, "want-vda": true, "want-vdb": true}
			for _, target := range []string{"vda", "vdb"} {
				dk, _ := d.Disk(target)
				used[filepath.Base(dk.Source)] = true
				o, ok := d.Metadata.Object(domxml.DiskObject(target))
				co, inCat := cat.get(u, domxml.DiskObject(target))
				if ok != inCat || ok && co.KeyID != o.KeyID {
					t.Fatalf("disk %s: catalog %+v (%v), definition %+v (%v)", target, co, inCat, o, ok)
				}
				if !ok {
					continue
				}
				wantSecrets = append(wantSecrets, u+"/"+o.KeyID)
				f, _ := imgFormat(dk.DriverType, true)
				info, err := qi.Info(ctx, qemuimg.Image{Path: dk.Source, Format: f, Key: diskKeyBytes(t, u, o)})
				if err != nil || info.LUKS == nil || info.LUKS.ActiveSlots() != 1 {
					t.Fatalf("disk %s: %+v %v: want one keyslot", target, info, err)
				}
			}
			slices.Sort(wantSecrets)
			if got := sec.defined(); !slices.Equal(got, wantSecrets) {
				t.Fatalf("secrets %v, want %v", got, wantSecrets)
			}
			ks, _ := m.readKept(u)
			for _, k := range ks {
				used[filepath.Base(k.Path)] = true
			}
			ents, _ := os.ReadDir(dir)
			for _, en := range ents {
				if !used[en.Name()] {
					t.Fatalf("file %s is neither used nor kept (kept: %+v)", en.Name(), ks)
				}
			}
			// And the VM can be operated on again (once per operation: it costs a whole
			// conversion, and TestDisks covers the operations themselves).
			if c.step != "defined" {
				return
			}
			if d.Metadata != nil {
				_, err = m.Unprotect(ctx, dom, "keep")
			} else {
				_, err = m.Protect(ctx, dom)
			}
			if err != nil {
				t.Fatalf("next operation after recovery: %v", err)
			}
		})
	}
}

// virshSecrets is Secrets through virsh (ephemeral, private secrets; the value from a
// 0600 file removed at once), for tests against the real libvirtd.
type virshSecrets struct {
	lv   virshLibvirt
	keys Keys
}

func (s virshSecrets) Ensure(ctx context.Context, vmUUID string, disks []domxml.Object) error {
	for _, o := range disks {
		su := domxml.SecretUUID(vmUUID, o.KeyID)
		f := filepath.Join(s.lv.tmp, "secret-"+su+".xml")
		x := "<secret ephemeral='yes' private='yes'><uuid>" + su + "</uuid><description>nkp: test disk " + o.Name + "</description></secret>"
		if err := os.WriteFile(f, []byte(x), 0o600); err != nil {
			return err
		}
		_, err := s.lv.run(ctx, "secret-define", f)
		os.Remove(f)
		if err != nil {
			return err
		}
		m := &Manager{cfg: Config{Keys: s.keys}}
		k, err := m.diskKey(ctx, "test", vmUUID, o)
		if err != nil {
			return err
		}
		vf := filepath.Join(s.lv.tmp, "value-"+su)
		err = os.WriteFile(vf, k, 0o600)
		clear(k)
		if err == nil {
			_, err = s.lv.run(ctx, "secret-set-value", su, "--file", vf, "--plain")
		}
		os.Remove(vf)
		if err != nil {
			return err
		}
	}
	return nil
}

func (s virshSecrets) Remove(ctx context.Context, vmUUID string, disks []domxml.Object) error {
	for _, o := range disks {
		s.lv.run(ctx, "secret-undefine", domxml.SecretUUID(vmUUID, o.KeyID))
	}
	return nil
}

// TestLiveDisks protects a raw and a qcow2-with-backing-chain disk of a domain in the real
// libvirtd with real secrets, starts it (no guest OS: QEMU opens the disks and sits in the
// firmware), and checks that libvirt took nkp's disk XML, that QEMU opened both disks
// with the secrets (status: opened encrypted) and that status of the shut-off domain
// shows the LUKS settings nkp chose. Then rekeys it shallowly and starts it again: the
// new secrets open the same images.
func TestLiveDisks(t *testing.T) {
	needLibvirt(t)
	ctx := context.Background()
	root := t.TempDir()
	for _, d := range []string{filepath.Dir(root), root} { // QEMU's user reaches the disks
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(root, "disks")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	diskImages(t, dir)
	var r [4]byte
	rand.Read(r[:])
	dom := "hostdvm-live-" + hex.EncodeToString(r[:])
	u := uuid.NewString()
	cfg, _ := crashConfig(root, 1)
	lv := cfg.Libvirt.(virshLibvirt)
	keys := cfg.Keys.(*fakeKeys)
	cfg.Secrets = virshSecrets{lv: lv, keys: keys}
	t.Cleanup(func() {
		exec.Command("virsh", "-c", "qemu:///system", "destroy", dom).Run()
		exec.Command("virsh", "-c", "qemu:///system", "undefine", dom).Run()
	})
	if err := lv.DefineXML(ctx, domainXML(dom, u, diskDevices(dir))); err != nil {
		t.Fatal(err)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v, err := m.ProtectWith(ctx, dom, vmapi.ProtectRequest{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d, err := domxml.Parse(must(lv.DomainXML(ctx, u))); err == nil && d.Metadata != nil {
			var objs []domxml.Object
			for _, o := range d.Metadata.Objects {
				objs = append(objs, o)
			}
			cfg.Secrets.Remove(ctx, u, objs)
		}
	})
	for _, d := range v.Disks[:2] {
		if !d.Protected || d.LUKS == nil || d.LUKS.Cipher != "aes-256-xts" || d.LUKS.ActiveSlots != 1 || d.LUKS.Iters > 100000 {
			t.Fatalf("disk %+v (LUKS %+v): want protected, aes-256-xts, one keyslot, few PBKDF iterations", d, d.LUKS)
		}
	}
	start := func(stage string) {
		t.Helper()
		// No hostd serves the vTPM here: the domain runs without its <tpm> meanwhile.
		full := must(lv.DomainXML(ctx, u))
		noTPM, err := domxml.SetTPM(full, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := lv.DefineXML(ctx, noTPM); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := lv.DefineXML(ctx, full); err != nil {
				t.Fatal(err)
			}
		}()
		// The images were written by root: libvirt's DAC gives them to QEMU's user.
		if out, err := exec.Command("virsh", "-c", "qemu:///system", "start", dom).CombinedOutput(); err != nil {
			t.Fatalf("%s: virsh start: %v\n%s", stage, err, out)
		}
		v, err := m.Status(ctx, dom)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range v.Disks[:2] {
			if d.OpenedEncrypted == nil || !*d.OpenedEncrypted {
				t.Fatalf("%s: disk %s: opened encrypted %v; problems %v", stage, d.Target, d.OpenedEncrypted, v.Problems)
			}
		}
		for _, p := range v.Problems {
			if strings.HasPrefix(p, "disk ") {
				t.Fatalf("%s: problem %s", stage, p)
			}
		}
		if out, err := exec.Command("virsh", "-c", "qemu:///system", "destroy", dom).CombinedOutput(); err != nil {
			t.Fatalf("%s: virsh destroy: %v\n%s", stage, err, out)
		}
	}
	start("after protect")
	keys.primary, keys.known = 2, 2
	if _, err := m.Rekey(ctx, dom); err != nil {
		t.Fatal(err)
	}
	start("after rekey")
}

// recoverAsAtStart runs Recover in a new Manager, as hostd does at its start, and checks
// that VM u's journal is gone afterwards.
func recoverAsAtStart(t *testing.T, ctx context.Context, root string, primary int, u string) (*Manager, *fileCatalog) {
	t.Helper()
	cfg, cat := crashConfig(root, primary)
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Recover(ctx); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if _, err := os.Stat(m.j.path(u)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("journal left after Recover: %v", err)
	}
	return m, cat
}
