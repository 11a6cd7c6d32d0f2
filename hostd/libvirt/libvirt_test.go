package libvirt

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm"
)

func open(t *testing.T) *Conn {
	t.Helper()
	c, err := Open("qemu:///system")
	if err != nil {
		if os.Getenv("NKP_E2E") == "required" {
			t.Fatalf("NKP_E2E=required: %v (run test/setup.sh)", err)
		}
		t.Skipf("%v (run test/setup.sh)", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestConn defines a domain with libvirt's emulator TPM through the real libvirtd, reads
// it back by name and UUID, starts it (QEMU under TCG sits in its firmware: no disk) and
// checks its TPM through the QEMU monitor, then reads a secret's value.
func TestConn(t *testing.T) {
	c := open(t)
	ctx := context.Background()
	var r [4]byte
	rand.Read(r[:])
	name := "hostdvm-libvirt-" + hex.EncodeToString(r[:])
	u := uuid.NewString()
	t.Cleanup(func() {
		exec.Command("virsh", "-c", "qemu:///system", "destroy", name).Run()
		exec.Command("virsh", "-c", "qemu:///system", "undefine", "--tpm", name).Run()
	})
	x := `<domain type='qemu'><name>` + name + `</name><uuid>` + u + `</uuid><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os><devices><controller type='usb' model='none'/><memballoon model='none'/>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>`
	if err := c.DefineXML(ctx, []byte(x)); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{name, u} {
		got, err := c.DomainXML(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		d, err := domxml.Parse(got)
		if err != nil || d.UUID != u || d.Name != name || len(d.TPMs) != 1 || d.TPMs[0].Backend != domxml.BackendEmulator {
			t.Fatalf("DomainXML(%s) = %+v, %v", ref, d, err)
		}
	}
	if _, err := c.DomainXML(ctx, "hostdvm-no-such-domain"); !errors.Is(err, vm.ErrNoDomain) {
		t.Fatalf("unknown domain: %v, want vm.ErrNoDomain", err)
	}
	if _, err := c.IsActive(ctx, uuid.NewString()); !errors.Is(err, vm.ErrNoDomain) {
		t.Fatalf("unknown UUID: %v, want vm.ErrNoDomain", err)
	}
	if ds, err := c.Domains(ctx); err != nil || !slices.Contains(ds, u) {
		t.Fatalf("Domains = %v, %v; want %s among them", ds, err, u)
	}
	if on, err := c.IsActive(ctx, name); err != nil || on {
		t.Fatalf("IsActive before start = %v, %v", on, err)
	}
	if err := c.TPMCheck(ctx, name); err == nil {
		t.Fatal("TPMCheck of a shut-off domain succeeded")
	}
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "start", name).CombinedOutput(); err != nil {
		t.Fatalf("virsh start: %v\n%s", err, out)
	}
	if on, err := c.IsActive(ctx, u); err != nil || !on {
		t.Fatalf("IsActive after start = %v, %v", on, err)
	}
	var err error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if err = c.TPMCheck(ctx, name); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("TPMCheck of the running domain: %v", err)
	}
}

func TestSecretValue(t *testing.T) {
	c := open(t)
	su := uuid.NewString()
	s, err := c.c.SecretDefineXML(`<secret ephemeral='yes' private='no'><uuid>`+su+`</uuid><description>hostdvm test</description></secret>`, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Undefine(); s.Free() }()
	if err := s.SetValue([]byte("pass phrase"), 0); err != nil {
		t.Fatal(err)
	}
	v, err := c.SecretValue(context.Background(), su)
	if err != nil || string(v) != "pass phrase" {
		t.Fatalf("SecretValue = %q, %v", v, err)
	}
	if _, err := c.SecretValue(context.Background(), uuid.NewString()); err == nil || !strings.Contains(err.Error(), "secret") {
		t.Fatalf("unknown secret: %v", err)
	}
}
