package hostd

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hookLogger is a qemu hook that appends "DOMAIN OPERATION SUBOPERATION" to
// /var/lib/nkp/hook.log, a path that each host has privately.
var hookLogger = []byte("#!/bin/sh\necho \"$1 $2 $3\" >>/var/lib/nkp/hook.log\nexit 0\n")

// TestTwoHostsPlainVM proves the two-host infrastructure with a VM that nkp does not
// manage (libvirt's own swtpm): each host runs its own hooks, a live migration A→B over
// the hosts' link keeps the guest's NV and PCRs, a save on B restores on A, and the VM
// survives a restart of A's libvirtd.
func TestTwoHostsPlainVM(t *testing.T) {
	a := requireHosts(t)
	hostA := newHost(t, "a", map[string][]byte{"log": hookLogger})
	hostB := newHost(t, "b", map[string][]byte{"log": hookLogger})
	link(t, hostA, hostB, 41)
	f := newVMFiles(t, a)
	d := newDomain(t, f, "plain", loopConfig("plain-nv", "plain-pcr"), "emulator")
	define(t, hostA, d, f.dir)
	virsh(t, hostA, "start", d.Name)
	recs := f.console.waitLoopAfter(t, 0)
	before := lastView(recs)
	checkView(t, "first boot on A", before, "plain-nv")

	// Hooks: A ran its own for this VM, B ran none, and the shared daemon's hook
	// directory did not get ours.
	logA, _ := os.ReadFile(hostA.Path("/var/lib/nkp/hook.log"))
	if !strings.Contains(string(logA), d.Name+" prepare begin") || !strings.Contains(string(logA), d.Name+" started begin") {
		t.Errorf("host A's hook log lacks prepare/started of %s:\n%s", d.Name, logA)
	}
	if logB, err := os.ReadFile(hostB.Path("/var/lib/nkp/hook.log")); err == nil {
		t.Errorf("host B ran hooks before any VM ran there:\n%s", logB)
	}
	if _, err := os.Stat("/etc/libvirt/hooks/qemu.d/log"); err == nil {
		t.Errorf("the hook installed in host A is visible at the real /etc/libvirt/hooks/qemu.d/log")
	}

	t.Run("live migration A to B", func(t *testing.T) {
		n := loopIndex(f.console.records())
		start := time.Now()
		virsh(t, hostA, "migrate", "--live", "--persistent", "--undefinesource", d.Name, hostB.URI, "--migrateuri", "tcp://"+hostB.IP)
		t.Logf("live migration took %v", time.Since(start).Round(time.Millisecond))
		if s := state(hostB, d.Name); s != "running" {
			t.Fatalf("on B after migration: state %q, want running", s)
		}
		if s := state(hostA, d.Name); s != "" {
			t.Errorf("on A after migration: state %q, want no such domain", s)
		}
		got := lastView(f.console.waitLoopAfter(t, n+1))
		if got != before {
			t.Errorf("after migration the guest reports %+v, want %+v", got, before)
		}
		logB, _ := os.ReadFile(hostB.Path("/var/lib/nkp/hook.log"))
		if !strings.Contains(string(logB), d.Name+" migrate begin") {
			t.Errorf("host B's hook log lacks the incoming migration of %s:\n%s", d.Name, logB)
		}
	})

	t.Run("save on B restore on A", func(t *testing.T) {
		img := filepath.Join(f.dir, "save.img")
		virsh(t, hostB, "save", d.Name, img)
		if s := state(hostB, d.Name); s != "shut off" {
			t.Fatalf("on B after save: state %q, want shut off", s)
		}
		n := loopIndex(f.console.records())
		virsh(t, hostA, "restore", img)
		if s := state(hostA, d.Name); s != "running" {
			t.Fatalf("on A after restore: state %q, want running", s)
		}
		got := lastView(f.console.waitLoopAfter(t, n+1))
		if got != before {
			t.Errorf("after save on B and restore on A the guest reports %+v, want %+v", got, before)
		}
	})

	t.Run("libvirtd restart on A", func(t *testing.T) {
		if err := hostA.StopLibvirtd(); err != nil {
			t.Fatal(err)
		}
		n := loopIndex(f.console.records())
		f.console.waitLoopAfter(t, n+1) // the guest runs on without libvirtd
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := hostA.StartLibvirtd(ctx); err != nil {
			t.Fatal(err)
		}
		if s := state(hostA, d.Name); s != "running" {
			t.Fatalf("on A after libvirtd restarted: state %q, want running", s)
		}
		logA, _ := os.ReadFile(hostA.Path("/var/lib/nkp/hook.log"))
		if !strings.Contains(string(logA), d.Name+" reconnect begin") {
			t.Errorf("host A's hook log lacks the reconnect of %s:\n%s", d.Name, logA)
		}
		virsh(t, hostA, "destroy", d.Name)
	})
}
