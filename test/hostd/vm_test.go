package hostd

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/internal/schedslice"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// protection is what nkp's metadata in a domain says: which provider, which KDK, which key.
type protection struct {
	providerID, kdkID string
	kdkVersion        int
	keyID             string
}

// protectionFor is a new vTPM key under the host's primary KDK.
func protectionFor(t *testing.T, d *hostd) protection {
	t.Helper()
	var s hostStatus
	e2e.WaitFor(t, time.Minute, "a primary KDK on host "+d.h.Name, func() bool {
		s = d.status(t)
		for _, k := range s.KDKs {
			if k.Primary && k.Err == "" {
				return true
			}
		}
		return false
	})
	id, v := s.primary(t)
	return protection{providerID: s.ProviderID, kdkID: id, kdkVersion: v, keyID: uuid.NewString()}
}

// nkpVM is a persistent protected domain on one host, its guest job set per boot.
type nkpVM struct {
	t       *testing.T // the test that owns the VM: removes it from every host at its end
	spec    domainSpec
	prot    protection
	f       vmFiles
	defined map[*libvirtns.Host]bool
}

func newNKPVM(t *testing.T, a guest.Artifacts, name string, prot protection) *nkpVM {
	t.Helper()
	f := newVMFiles(t, a)
	spec := domainSpec{Name: "nkp-hostd-" + name + "-" + randHex(t, 4), UUID: uuid.NewString(),
		Kernel: f.kernel, Initrd: f.initrd, Console: string(f.console)}
	return &nkpVM{t: t, spec: spec, prot: prot, f: f, defined: map[*libvirtns.Host]bool{}}
}

// protect defines the VM on h as its spec says (no TPM, or libvirt's own swtpm) and
// protects it through hostd's API (what `nkpctl vm protect` does); the VM's metadata is
// then what protect chose.
func (vm *nkpVM) protect(t *testing.T, h *libvirtns.Host, d *hostd, cfg guest.Config) {
	t.Helper()
	vm.definePlain(t, h, cfg)
	vm.protectNow(t, d)
}

// definePlain defines the VM from its spec alone, without nkp's metadata.
func (vm *nkpVM) definePlain(t *testing.T, h *libvirtns.Host, cfg guest.Config) {
	t.Helper()
	args, err := cfg.KernelArgs()
	if err != nil {
		t.Fatal(err)
	}
	vm.spec.Cmdline = args + noTimerCheck
	virsh(t, h, "define", vm.spec.write(t, vm.f.dir))
	vm.cleanupOn(h)
}

// protectNow protects the defined, shut-off VM through d's API and returns hostd's note.
func (vm *nkpVM) protectNow(t *testing.T, d *hostd) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	got, err := d.vms().Protect(ctx, vm.spec.Name)
	if err != nil {
		t.Fatalf("protect %s: %v", vm.spec.Name, err)
	}
	vm.setProtection(t, got)
	return got.Note
}

func (vm *nkpVM) setProtection(t *testing.T, got vmapi.VM) {
	t.Helper()
	if !got.Protected || len(got.Objects) != 1 || got.Objects[0].Name != "vtpm" {
		t.Fatalf("%s: hostd returned %+v, want one protected vtpm object", vm.spec.Name, got)
	}
	o := got.Objects[0]
	vm.prot = protection{providerID: got.ProviderID, kdkID: o.KDKID, kdkVersion: o.KDKVersion, keyID: o.KeyID}
}

func (vm *nkpVM) cleanupOn(h *libvirtns.Host) {
	if !vm.defined[h] {
		vm.defined[h] = true
		vm.t.Cleanup(func() {
			h.Virsh(context.Background(), "destroy", vm.spec.Name)
			h.Virsh(context.Background(), "undefine", vm.spec.Name)
		})
	}
}

// define (re)defines the VM on h with guest job cfg; Cleanup removes it from h.
func (vm *nkpVM) define(t *testing.T, h *libvirtns.Host, cfg guest.Config) {
	t.Helper()
	args, err := cfg.KernelArgs()
	if err != nil {
		t.Fatal(err)
	}
	vm.spec.Cmdline = args + noTimerCheck
	p := writeProtected(t, vm.spec, vm.f.dir, vm.prot)
	virsh(t, h, "define", p)
	vm.cleanupOn(h)
}

// boot starts the VM on h, waits for the agent's verdict and the power-off, and returns
// the records of this boot. The agent must succeed.
func (vm *nkpVM) boot(t *testing.T, h *libvirtns.Host) []guest.Record {
	t.Helper()
	n := len(vm.f.console.records())
	startRetrying(t, h, vm.spec.Name)
	recs := vm.f.console.waitFor(t, "this boot's verdict", func(r []guest.Record) bool {
		return len(r) > n && hasKey(r[n:], "done")
	})[n:]
	if v, _ := guest.Last(recs, "done"); v != "ok" {
		t.Fatalf("the guest agent failed: %v\n%s", recs, vm.f.console.tail())
	}
	e2e.WaitFor(t, 2*time.Minute, vm.spec.Name+" powered off", func() bool { return state(h, vm.spec.Name) == "shut off" })
	return recs
}

// startRetrying starts the domain on h; while the hook refuses because nkp-hostd is still
// defining a disk's secret (right after hostd started: the refusal tells the operator to
// run the start again in a few seconds), it does that, for up to a minute.
func startRetrying(t *testing.T, h *libvirtns.Host, name string) {
	t.Helper()
	var out string
	var err error
	deadline := time.Now().Add(time.Minute)
	for {
		if out, err = h.Virsh(context.Background(), "start", name); err == nil {
			return
		}
		if !strings.Contains(out, "is defining it now") || time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
	}
}

func hasKey(recs []guest.Record, key string) bool {
	_, ok := guest.Last(recs, key)
	return ok
}

// writeProtected writes d's XML with nkp's metadata for prot; it returns the file.
func writeProtected(t *testing.T, d domainSpec, dir string, prot protection) string {
	t.Helper()
	p, _ := protectXMLKey(t, d, dir, prot.providerID, prot.kdkID, prot.kdkVersion, prot.keyID)
	return p
}

// wantNV checks the NV value the guest printed in recs.
func wantNV(t *testing.T, what string, recs []guest.Record, nv string) {
	t.Helper()
	if v, _ := guest.Last(recs, "nv"); v != nv {
		t.Errorf("%s: the guest reads NV %q, want %q\n%v", what, v, nv, recs)
	}
	if v, _ := guest.Last(recs, "tpm"); v != "2.0" {
		t.Errorf("%s: the guest sees TPM %q, want 2.0", what, v)
	}
}

var nvRead = guest.Config{Actions: []string{guest.ActionNVRead}}

// TestProtectedVM runs one VM protected through hostd's API (as `nkpctl vm protect`) on a
// host with a socket host TPM through its life: first boot writes NV; the value survives
// power cycles and a hostd restart; hostd killed with -9 while the VM runs, libvirtd
// restarted while it runs, and virsh save/restore leave its TPM as it was; and with the
// provider stopped and hostd restarted the VM still starts (KDK from the host TPM).
func TestProtectedVM(t *testing.T) {
	a := requireHosts(t)
	bins := buildNKP(t)
	h := newHost(t, "vm", hookFiles(t))
	uplink(t, h, 61)
	p := startProvider(t, h.Gateway)
	d := joinHost(t, h, p, startHostTPM(t, bins.swtpm), bins)
	vm := newNKPVM(t, a, "life", protection{})
	vm.protect(t, h, d, guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "nv-first-boot"})
	wantNV(t, "first boot", vm.boot(t, h), "nv-first-boot")
	vm.define(t, h, nvRead)

	steps := []struct {
		name   string
		before func(t *testing.T)
	}{
		{"power cycle", func(t *testing.T) {}},
		{"hostd restarted", func(t *testing.T) { d.stop(t); d.start(t) }},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.before(t)
			wantNV(t, st.name, vm.boot(t, h), "nv-first-boot")
		})
	}
	if t.Failed() {
		return
	}

	// The VM keeps running through what happens to hostd and libvirtd around it.
	vm.define(t, h, running)
	before := vm.start(t, h)
	checkView(t, "running boot", before, "nv-first-boot")
	checkVTPMSlice(t, h, vm.spec.UUID)
	live := []struct {
		name   string
		action func(t *testing.T)
	}{
		{"hostd killed with -9", func(t *testing.T) { d.kill(); vm.runsOn(t); d.start(t) }},
		{"libvirtd restarted", func(t *testing.T) {
			if err := h.StopLibvirtd(); err != nil {
				t.Fatal(err)
			}
			vm.runsOn(t)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := h.StartLibvirtd(ctx); err != nil {
				t.Fatal(err)
			}
		}},
		{"save and restore", func(t *testing.T) {
			img := filepath.Join(vm.f.dir, "save.img")
			virsh(t, h, "save", vm.spec.Name, img)
			if s := state(h, vm.spec.Name); s != "shut off" {
				t.Fatalf("state %q after save, want shut off", s)
			}
			virsh(t, h, "restore", img)
			os.Remove(img)
		}},
	}
	for _, st := range live {
		t.Run(st.name, func(t *testing.T) {
			st.action(t)
			if s := state(h, vm.spec.Name); s != "running" {
				t.Fatalf("state %q, want running", s)
			}
			if got := vm.runsOn(t); got != before {
				t.Errorf("the guest's TPM shows %+v, want %+v as before", got, before)
			}
			// nkpctl vm status: present (query-tpm) and answering (the vTPM's status
			// channel), also for a vTPM the new hostd adopted.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if v, err := d.vms().Get(ctx, vm.spec.Name); err != nil || !v.Running || v.TPM != "ok" {
				t.Errorf("status of the running VM: %+v, %v; want running with TPM ok", v, err)
			}
		})
	}
	t.Run("stop and start after all that", func(t *testing.T) {
		virsh(t, h, "destroy", vm.spec.Name)
		vm.define(t, h, nvRead)
		wantNV(t, "boot after the running steps", vm.boot(t, h), "nv-first-boot")
	})
	t.Run("provider stopped and hostd restarted", func(t *testing.T) {
		p.stop(t)
		d.stop(t)
		d.start(t)
		wantNV(t, "start with the provider down", vm.boot(t, h), "nv-first-boot")
	})
}

// checkVTPMSlice: the VM's nkp-swtpm runs with the short time slice it inherits from
// nkp-hostd (go doc internal/schedslice), on kernels that take one (6.12 and later).
func checkVTPMSlice(t *testing.T, h *libvirtns.Host, vmUUID string) {
	t.Helper()
	if d, err := schedslice.Of(0); err != nil || d == 0 {
		return
	}
	raw, err := os.ReadFile(h.Path("/run/nkp/vtpm/" + vmUUID + ".json"))
	if err != nil {
		t.Fatalf("the vTPM's record: %v", err)
	}
	var rec struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil || rec.PID == 0 {
		t.Fatalf("the vTPM's record %s: pid %d, %v", raw, rec.PID, err)
	}
	if d, err := schedslice.Of(rec.PID); err != nil || d != schedslice.Short {
		t.Errorf("nkp-swtpm (pid %d) has a time slice of %v (%v), want %v from nkp-hostd", rec.PID, d, err, schedslice.Short)
	}
}

// running is a boot that stays up: it extends PCR16 once and prints PCR0, PCR16 and the
// NV value every second.
var running = guest.Config{Actions: []string{guest.ActionExtend, guest.ActionLoop}, Extend: "pcr-running", Loop: 600}

// start starts the VM on h with its current job and waits for the first loop line of
// this boot; it returns the TPM as the guest sees it.
func (vm *nkpVM) start(t *testing.T, h *libvirtns.Host) tpmView {
	t.Helper()
	n := len(vm.f.console.records())
	virsh(t, h, "start", vm.spec.Name)
	recs := vm.f.console.waitFor(t, "a loop line of this boot", func(r []guest.Record) bool {
		return len(r) > n && hasKey(r[n:], "loop")
	})
	return lastView(recs[n:])
}

// runsOn waits until the guest prints a loop line it had not printed before: it still runs.
func (vm *nkpVM) runsOn(t *testing.T) tpmView {
	t.Helper()
	return lastView(vm.f.console.waitLoopAfter(t, loopIndex(vm.f.console.records())))
}
