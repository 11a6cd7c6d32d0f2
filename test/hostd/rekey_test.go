package hostd

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
)

// TestRekeyAndAdopt covers the key lifecycle around a protected VM: the provider rotates
// the KDK, `nkpctl vm rekey` (hostd's API) moves the VM's vTPM to the new version and its
// NV survives; the old version is then retired at the provider (the catalog shows nothing
// left on it) and the VM still boots. And a VM that had libvirt's own swtpm is adopted by
// protect with its NV intact.
func TestRekeyAndAdopt(t *testing.T) {
	a := requireHosts(t)
	bins := buildNKP(t)
	h := newHost(t, "rk", hookFiles(t))
	uplink(t, h, 65)
	p := startProvider(t, h.Gateway)
	d := joinHost(t, h, p, startHostTPM(t, bins.swtpm), bins, "--sync-interval", "2s")

	t.Run("rotate, rekey, retire", func(t *testing.T) {
		vm := newNKPVM(t, a, "rekey", protection{})
		vm.protect(t, h, d, guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "nv-before-rekey"})
		old := vm.prot.kdkVersion
		wantNV(t, "boot before rotation", vm.boot(t, h), "nv-before-rekey")
		p.ctl(t, "rotate")
		p.backup(t) // the provider releases no KDK version that is in no backup
		e2e.WaitFor(t, time.Minute, "hostd to see the new primary KDK", func() bool {
			for _, k := range d.status(t).KDKs {
				if k.Primary && k.Version > old {
					return true
				}
			}
			return false
		})
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		got, err := d.vms().Rekey(ctx, vm.spec.Name)
		cancel()
		if err != nil {
			t.Fatalf("rekey: %v", err)
		}
		oldKey := vm.prot.keyID
		vm.setProtection(t, got)
		if vm.prot.kdkVersion <= old {
			t.Fatalf("after rekey the vTPM is on KDK version %d, want above %d", vm.prot.kdkVersion, old)
		}
		t.Logf("rekey: key %s on version %d -> key %s on version %d", oldKey, old, vm.prot.keyID, vm.prot.kdkVersion)
		vm.define(t, h, nvRead)
		wantNV(t, "boot after rekey", vm.boot(t, h), "nv-before-rekey")
		p.ctl(t, "retire", strconv.Itoa(old))
		e2e.WaitFor(t, time.Minute, "hostd to drop the retired KDK version", func() bool {
			for _, k := range d.status(t).KDKs {
				if k.Version == old {
					return false
				}
			}
			return true
		})
		wantNV(t, "boot after the old version was retired", vm.boot(t, h), "nv-before-rekey")
	})

	t.Run("adopt libvirt's swtpm", func(t *testing.T) {
		vm := newNKPVM(t, a, "adopt", protection{})
		vm.spec.TPM = "emulator"
		vm.definePlain(t, h, guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "nv-from-libvirt-swtpm"})
		wantNV(t, "boot with libvirt's swtpm", vm.boot(t, h), "nv-from-libvirt-swtpm")
		note := vm.protectNow(t, d)
		if !strings.Contains(note, "adopt") {
			t.Errorf("protect's note %q does not say it adopted libvirt's swtpm state", note)
		}
		vm.define(t, h, nvRead)
		wantNV(t, "boot after adoption", vm.boot(t, h), "nv-from-libvirt-swtpm")
	})
}
