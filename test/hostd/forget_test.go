package hostd

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
)

// TestForget is the way out for a protected VM deleted the usual way (virsh undefine),
// with the real provider, nkp-hostd, libvirtd and nkpctl: while its objects are in the
// catalog the old KDK version cannot be retired after a rotation; status reports the
// state nkp keeps and names nkpctl vm forget; forget refuses without --yes and by a name
// nkp cannot know, then, by the name the vTPM-only VM had (hostd recorded it), removes
// the vTPM state directory and the catalog objects; a VM with an encrypted disk is
// forgotten by the name it had, its plaintext original and secrets gone, its own
// encrypted disk left; after that the old version retires. On a host the provider
// revoked, forget refuses naming --local-only, which removes the host's side and names
// the administrator's command, which then removes the catalog's.
func TestForget(t *testing.T) {
	a := requireHosts(t)
	bins := buildNKP(t)
	h := newHost(t, "fg", hookFiles(t))
	uplink(t, h, 74)
	p := startProvider(t, h.Gateway)
	d := joinHost(t, h, p, startHostTPM(t, bins.swtpm), bins, "--sync-interval", "2s")

	vm := newNKPVM(t, a, "forget", protection{})
	vm.protect(t, h, d, guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "nv-forgotten"})
	old := vm.prot.kdkVersion
	dir := h.Path("/var/lib/nkp/hostd/vtpm/" + vm.spec.UUID)
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("protect left no vTPM state directory: %v", err)
	}
	objects := func() []apiv1.Object {
		t.Helper()
		var objs []apiv1.Object
		out := p.ctl(t, "objects", "--vm", vm.spec.UUID, "--json")
		if err := json.Unmarshal([]byte(out), &objs); err != nil {
			t.Fatalf("objects --json: %v in %q", err, out)
		}
		return objs
	}
	if objs := objects(); len(objs) != 1 || objs[0].Name != "vtpm" || objs[0].KeyID != vm.prot.keyID {
		t.Fatalf("catalog of the protected VM: %+v, want its vtpm key %s", objs, vm.prot.keyID)
	}
	// A second VM with an encrypted disk, its plaintext original kept for --finalize.
	dvm := newNKPVM(t, a, "forget-disk", protection{})
	orig := filepath.Join(dvm.f.dir, "vda.raw")
	makeRaw(t, orig, 16<<20, "m-forget", 1<<20)
	dvm.spec.Disks = []diskSpec{{Dev: "vda", Format: "raw", File: orig}}
	dvm.definePlain(t, h, diskJob(guest.ActionDiskRead, ""))
	t.Logf("nkpctl vm protect:\n%s", d.mustCtl(t, "protect", dvm.spec.Name))
	dobjs := dvm.diskObjects(t, d)
	encrypted := disks(t, h, dvm.spec.Name, true)["vda"].Source.File
	if _, err := os.Stat(orig); err != nil || encrypted == orig {
		t.Fatalf("after protect: original %v, disk %s; want the original kept and a new encrypted file", err, encrypted)
	}
	waitSecrets(t, h, true, secretsOf(dvm, dobjs)...)

	p.ctl(t, "rotate")
	p.backup(t)
	if _, err := p.tryCtl("retire", strconv.Itoa(old)); err == nil || !strings.Contains(err.Error(), "in_use") {
		t.Fatalf("retire of v%d while the VM's object uses it: %v, want refused (in_use)", old, err)
	}

	virsh(t, h, "undefine", vm.spec.Name)
	st := d.mustCtl(t, "status", vm.spec.UUID)
	for _, want := range []string{"libvirt defines no domain " + vm.spec.UUID, "nkpctl vm forget " + vm.spec.UUID} {
		if !strings.Contains(st, want) {
			t.Errorf("status of the undefined VM does not say %q:\n%s", want, st)
		}
	}
	if out, err := d.nkpctl(t, "forget", vm.spec.UUID); err == nil || !strings.Contains(out, "--yes") {
		t.Fatalf("forget without --yes (no terminal): %v\n%s; want a refusal naming --yes", err, out)
	}
	if out, err := d.nkpctl(t, "forget", "--yes", vm.spec.Name+"-never"); err == nil || !strings.Contains(out, "give the VM's UUID") {
		t.Fatalf("forget by a name nkp never knew: %v\n%s; want a refusal asking for the UUID", err, out)
	}
	if _, err := os.Stat(dir); err != nil || len(objects()) != 1 {
		t.Fatalf("a refused forget changed something: state %v, catalog %+v", err, objects())
	}

	// By the name it had: a vTPM-only VM keeps no disk file, hostd recorded its name.
	out := d.mustCtl(t, "forget", "--yes", vm.spec.Name)
	t.Logf("nkpctl vm forget:\n%s", out)
	for _, want := range []string{vm.spec.Name + " (" + vm.spec.UUID + "): forgotten", "catalog: removed vtpm", vm.prot.keyID, "vTPM state removed"} {
		if !strings.Contains(out, want) {
			t.Errorf("forget's output does not say %q", want)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("vTPM state directory after forget: %v, want gone", err)
	}
	if objs := objects(); len(objs) != 0 {
		t.Fatalf("catalog after forget: %+v, want nothing of the VM", objs)
	}
	if out, err := d.nkpctl(t, "status", vm.spec.UUID); err == nil {
		t.Errorf("status after forget still knows the VM:\n%s", out)
	}
	// The disk VM, by the name it had (nkp recorded it with the kept original): its
	// plaintext original and its catalog objects go, its secrets too; the encrypted file
	// its definition named is the VM's own disk, which forget leaves (virsh undefine
	// --remove-all-storage removes it).
	virsh(t, h, "undefine", dvm.spec.Name)
	out = d.mustCtl(t, "forget", "--yes", dvm.spec.Name)
	t.Logf("nkpctl vm forget %s:\n%s", dvm.spec.Name, out)
	if !strings.Contains(out, "catalog: removed disk:vda") || !strings.Contains(out, "kept file removed: "+orig) {
		t.Errorf("forget of the disk VM does not report its disk object and kept original:\n%s", out)
	}
	if _, err := os.Stat(orig); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the plaintext original %s after forget: %v, want removed", orig, err)
	}
	if _, err := os.Stat(encrypted); err != nil {
		t.Errorf("the VM's own encrypted disk %s after forget: %v, want left", encrypted, err)
	}
	waitSecrets(t, h, false, secretsOf(dvm, dobjs)...)
	var left []apiv1.Object
	if err := json.Unmarshal([]byte(p.ctl(t, "objects", "--vm", dvm.spec.UUID, "--json")), &left); err != nil || len(left) != 0 {
		t.Fatalf("catalog after forgetting the disk VM: %+v, %v; want empty", left, err)
	}

	p.ctl(t, "retire", strconv.Itoa(old))
	e2e.WaitFor(t, time.Minute, "hostd to drop the retired KDK version", func() bool {
		for _, k := range d.status(t).KDKs {
			if k.Version == old {
				return false
			}
		}
		return true
	})
	if out := d.mustCtl(t, "forget", "--yes", vm.spec.UUID); !strings.Contains(out, "nothing to forget") {
		t.Errorf("forget again: %q, want nothing to forget", out)
	}

	// The host is gone for good (decommissioned): only an administrator can remove its
	// VMs' objects, once it is revoked.
	t.Run("admin forgets a revoked host's VM", func(t *testing.T) {
		gone := newNKPVM(t, a, "forget-admin", protection{})
		gone.protect(t, h, d, guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "nv-host-gone"})
		hostID := d.status(t).HostID
		if _, err := p.tryCtl("objects", "forget", "--vm", gone.spec.UUID, "--yes"); err == nil || !strings.Contains(err.Error(), "nkpctl provider revoke "+hostID) {
			t.Fatalf("admin forget of a live host's VM: %v, want refused naming the revoke", err)
		}
		p.ctl(t, "revoke", hostID)
		// The revoked host itself: a plain forget changes nothing and names the way out;
		// --local-only removes its side and names the administrator's command.
		virsh(t, h, "undefine", gone.spec.Name)
		gdir := h.Path("/var/lib/nkp/hostd/vtpm/" + gone.spec.UUID)
		if out, err := d.nkpctl(t, "forget", "--yes", gone.spec.Name); err == nil || !strings.Contains(out, "--local-only --yes") {
			t.Fatalf("forget on a revoked host: %v\n%s; want a refusal naming --local-only", err, out)
		}
		if _, err := os.Stat(gdir); err != nil {
			t.Fatalf("a refused forget removed the vTPM state: %v", err)
		}
		out := d.mustCtl(t, "forget", "--yes", "--local-only", gone.spec.Name)
		t.Logf("nkpctl vm forget --local-only:\n%s", out)
		for _, want := range []string{"catalog: left    vtpm", gone.prot.keyID, "nkpctl provider objects forget --vm " + gone.spec.UUID + " --yes", "vTPM state removed"} {
			if !strings.Contains(out, want) {
				t.Errorf("forget --local-only's output does not say %q", want)
			}
		}
		if _, err := os.Stat(gdir); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("vTPM state after forget --local-only: %v, want gone", err)
		}
		_, err := p.tryCtl("objects", "forget", "--vm", gone.spec.UUID)
		if err == nil || !strings.Contains(err.Error(), "would remove 1 catalog object") || !strings.Contains(err.Error(), "without --yes") {
			t.Fatalf("admin forget without --yes: %v, want the object listed and nothing changed", err)
		}
		if objs := p.ctl(t, "objects", "--vm", gone.spec.UUID, "--json"); !strings.Contains(objs, gone.prot.keyID) {
			t.Fatalf("catalog after a forget without --yes: %s, want the VM's object", objs)
		}
		var removed []apiv1.Object
		if err := json.Unmarshal([]byte(p.ctl(t, "objects", "forget", "--vm", gone.spec.UUID, "--yes", "--json")), &removed); err != nil || len(removed) != 1 || removed[0].HostID != hostID {
			t.Fatalf("admin forget --yes: %+v, %v; want the VM's vtpm object of host %s", removed, err, hostID)
		}
		if out := p.ctl(t, "objects", "--vm", gone.spec.UUID, "--json"); strings.Contains(out, gone.prot.keyID) {
			t.Fatalf("catalog after the admin's forget: %s", out)
		}
		if out := p.ctl(t, "audit", "--json"); !strings.Contains(out, `"forget"`) {
			t.Errorf("the audit log has no forget record")
		}
	})
}
