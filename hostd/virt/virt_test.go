package virt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/vm"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestLibvirt runs against the machine's libvirtd: a tiny TCG domain is defined, started
// and destroyed; the adapter reads it and delivers the lifecycle events.
func TestLibvirt(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, "virsh")
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "list").CombinedOutput(); err != nil {
		e2e.Unavailable(t, fmt.Sprintf("libvirtd not running (run test/setup.sh): %v %s", err, out))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := Open(ctx, "qemu:///system", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	next := func(want EventKind, uuid string) {
		t.Helper()
		deadline := time.After(60 * time.Second)
		for {
			select {
			case ev := <-c.Events():
				if ev.Kind == want && ev.UUID == uuid {
					return
				}
			case <-deadline:
				t.Fatalf("no event %d for %s within 60 s", want, uuid)
			}
		}
	}
	next(Reconnected, "")

	uuid := kdk.NewKeyID()
	name := "hostd-core-virt-" + uuid[:8]
	xml := fmt.Sprintf(`<domain type='qemu'><name>%s</name><uuid>%s</uuid><memory unit='MiB'>32</memory>
<os><type arch='x86_64'>hvm</type></os><devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>`, name, uuid)
	if st, err := c.DomainState(ctx, uuid); err != nil || st.Known {
		t.Fatalf("state of an unknown domain: %+v, %v", st, err)
	}
	if _, err := c.DomainXML(ctx, name); !errors.Is(err, vm.ErrNoDomain) {
		t.Fatalf("DomainXML of an unknown domain: %v", err)
	}
	if err := c.DefineXML(ctx, []byte(xml)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("virsh", "-c", "qemu:///system", "destroy", uuid).Run()
		exec.Command("virsh", "-c", "qemu:///system", "undefine", uuid).Run()
	})
	uuids, err := c.Domains(ctx)
	if err != nil || !contains(uuids, uuid) {
		t.Fatalf("Domains = %v, %v", uuids, err)
	}
	if got, err := c.DomainXML(ctx, uuid); err != nil || len(got) == 0 {
		t.Fatalf("DomainXML: %v", err)
	}
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "start", uuid).CombinedOutput(); err != nil {
		t.Fatalf("virsh start: %v %s", err, out)
	}
	next(Started, uuid)
	if st, err := c.DomainState(ctx, uuid); err != nil || !st.Known || !st.Active {
		t.Fatalf("state of the running domain: %+v, %v", st, err)
	}
	if lc, err := c.Lifecycle(ctx, name); err != nil || !lc.Active || !lc.Persistent || lc.ManagedSave {
		t.Fatalf("Lifecycle of the running domain: %+v %v", lc, err)
	}
	if err := c.TPMCheck(ctx, uuid); err == nil {
		t.Error("TPMCheck passed on a domain without a TPM")
	}
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "destroy", uuid).CombinedOutput(); err != nil {
		t.Fatalf("virsh destroy: %v %s", err, out)
	}
	next(Stopped, uuid)
	if st, _ := c.DomainState(ctx, uuid); st.Active {
		t.Error("domain still active after destroy")
	}

	// A managed save image, and a transient domain: hostd/vm refuses to change either.
	virsh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("virsh %v: %v %s", args, err, out)
		}
	}
	if lc, err := c.Lifecycle(ctx, name); err != nil || lc.ManagedSave || lc.Active {
		t.Fatalf("Lifecycle before managedsave: %+v %v", lc, err)
	}
	virsh("start", uuid)
	virsh("managedsave", uuid)
	if lc, err := c.Lifecycle(ctx, name); err != nil || !lc.ManagedSave || lc.Active {
		t.Fatalf("Lifecycle after managedsave: %+v %v", lc, err)
	}
	virsh("managedsave-remove", uuid)
	if lc, err := c.Lifecycle(ctx, uuid); err != nil || !lc.Persistent || lc.ManagedSave {
		t.Fatalf("Lifecycle of a defined domain: %+v %v", lc, err)
	}
	tuuid := kdk.NewKeyID()
	txml := strings.NewReplacer(uuid, tuuid, name, name+"-t").Replace(xml)
	f := filepath.Join(t.TempDir(), "transient.xml")
	if err := os.WriteFile(f, []byte(txml), 0o600); err != nil {
		t.Fatal(err)
	}
	virsh("create", f)
	t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "destroy", tuuid).Run() })
	if lc, err := c.Lifecycle(ctx, tuuid); err != nil || lc.Persistent || !lc.Active {
		t.Fatalf("Lifecycle of a transient domain: %+v %v", lc, err)
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
