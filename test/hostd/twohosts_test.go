package hostd

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// TestTwoHostsProtected runs a protected VM across two hosts joined to one provider, each
// with its own hostd, host TPM and directories: saved on A it restores on B (B's hostd
// derives the same vTPM key from the cluster KDK), saved on B it restores on A, and a
// live migration A→B keeps its NV and PCRs; B, where it runs now, owns its catalog
// objects, so a forget on A (after virsh undefine) removes only A's stale state; B's KDK
// cache replaced with A's blob (bound to
// A's TPM) is refused with a clear virsh error while the provider is down.
func TestTwoHostsProtected(t *testing.T) {
	a := requireHosts(t)
	bins := buildNKP(t)
	hooks := hookFiles(t)
	hostA, hostB := newHost(t, "ta", hooks), newHost(t, "tb", hooks)
	link(t, hostA, hostB, 42)
	uplink(t, hostA, 63)
	uplink(t, hostB, 64)
	p := startProvider(t, hostA.Gateway)
	dA := joinHost(t, hostA, p, startHostTPM(t, bins.swtpm), bins)
	dB := joinHost(t, hostB, p, startHostTPM(t, bins.swtpm), bins)
	if sa, sb := dA.status(t), dB.status(t); sa.HostID == sb.HostID {
		t.Fatalf("both hosts joined as %s", sa.HostID)
	}
	vm := newNKPVM(t, a, "twohosts", protection{})
	vm.protect(t, hostA, dA, loopConfig("nv-two-hosts", "pcr-two-hosts"))
	vm.define(t, hostA, loopConfig("nv-two-hosts", "pcr-two-hosts")) // tpm-tis: QEMU 7.2's CRB can lose a response in a live migration
	before := vm.start(t, hostA)
	checkView(t, "boot on A", before, "nv-two-hosts")

	moves := []struct {
		name     string
		from, to *libvirtns.Host
		move     func(t *testing.T, from, to *libvirtns.Host)
	}{
		{"saved on A restores on B", hostA, hostB, saveRestore},
		{"saved on B restores on A", hostB, hostA, saveRestore},
		{"live migration A to B", hostA, hostB, func(t *testing.T, from, to *libvirtns.Host) {
			start := time.Now()
			virsh(t, from, "migrate", "--live", "--persistent", vm.spec.Name, to.URI, "--migrateuri", "tcp://"+to.IP)
			t.Logf("live migration took %v", time.Since(start).Round(time.Millisecond))
		}},
	}
	for _, mv := range moves {
		t.Run(mv.name, func(t *testing.T) {
			mv.move(t, mv.from, mv.to)
			if s := state(mv.to, vm.spec.Name); s != "running" {
				t.Fatalf("on the destination: state %q, want running", s)
			}
			if s := state(mv.from, vm.spec.Name); s == "running" {
				t.Errorf("on the source: still running")
			}
			if got := vm.runsOn(t); got != before {
				t.Errorf("the guest's TPM shows %+v, want %+v as before", got, before)
			}
		})
		if t.Failed() {
			return
		}
	}
	vm.cleanupOn(hostB)

	// The VM runs on B now, so B claimed its catalog objects when it started there; A's
	// copy of its state is stale, and a forget on A (after virsh undefine) removes that
	// copy but none of the objects the VM on B needs.
	t.Run("forget on the host it left", func(t *testing.T) {
		idB := dB.status(t).HostID
		var objs []apiv1.Object
		e2e.WaitFor(t, time.Minute, "host B to own the VM's catalog objects", func() bool {
			if err := json.Unmarshal([]byte(p.ctl(t, "objects", "--vm", vm.spec.UUID, "--json")), &objs); err != nil {
				t.Fatal(err)
			}
			return len(objs) == 1 && objs[0].HostID == idB
		})
		virsh(t, hostA, "undefine", vm.spec.Name)
		out := dA.mustCtl(t, "forget", "--yes", vm.spec.UUID)
		t.Logf("nkpctl vm forget on A:\n%s", out)
		if !strings.Contains(out, "belong to host "+idB) || strings.Contains(out, "catalog: removed") {
			t.Errorf("forget on A does not leave the objects to host B:\n%s", out)
		}
		if err := json.Unmarshal([]byte(p.ctl(t, "objects", "--vm", vm.spec.UUID, "--json")), &objs); err != nil || len(objs) != 1 || objs[0].HostID != idB {
			t.Fatalf("catalog after forget on A: %+v, %v; want the VM's object, host B's", objs, err)
		}
		if _, err := os.Stat(hostA.Path("/var/lib/nkp/hostd/vtpm/" + vm.spec.UUID)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("A's stale vTPM state after forget: %v, want gone", err)
		}
		if s := state(hostB, vm.spec.Name); s != "running" {
			t.Errorf("the VM on B: %q, want running", s)
		}
	})

	// B's cached KDK replaced by A's blob (made for A's TPM): B's TPM cannot unwrap it,
	// and with the provider down there is no fresh one to fetch.
	t.Run("KDK blob from another host's TPM", func(t *testing.T) {
		virsh(t, hostB, "destroy", vm.spec.Name)
		p.stop(t)
		dB.stop(t)
		kdkA, kdkB := hostA.Path("/var/lib/nkp/hostd/kdk"), hostB.Path("/var/lib/nkp/hostd/kdk")
		blobs, err := os.ReadDir(kdkA)
		if err != nil || len(blobs) == 0 {
			t.Fatalf("host A's KDK cache %s: %v, %d files", kdkA, err, len(blobs))
		}
		for _, b := range blobs {
			raw, err := os.ReadFile(filepath.Join(kdkA, b.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(kdkB, b.Name()), raw, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		dB.start(t)
		refusedStart(t, hostB, vm, "cannot unwrap its cached KDK version")
	})
}

// saveRestore saves the one VM running on from into a file both hosts see and restores it
// on to.
func saveRestore(t *testing.T, from, to *libvirtns.Host) {
	t.Helper()
	out := virsh(t, from, "list", "--name")
	var name string
	if f := strings.Fields(out); len(f) == 1 {
		name = f[0]
	}
	if name == "" {
		t.Fatalf("want one VM running on host %s, virsh list shows %q", from.Name, out)
	}
	dir, err := os.MkdirTemp("", "nkp-hostd-save-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o711)
	img := filepath.Join(dir, "save.img")
	virsh(t, from, "save", name, img)
	virsh(t, to, "restore", img)
}
