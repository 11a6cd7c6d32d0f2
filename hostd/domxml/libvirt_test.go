package domxml

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// virsh runs virsh against the system libvirtd; the test skips when there is none
// (fails under NKP_E2E=required).
func virsh(t *testing.T, args ...string) []byte {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-q", "-c", "qemu:///system"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
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

// TestLibvirtRoundTrip defines what SetMetadata and SetTPM write with the real libvirtd,
// reads it back with dumpxml, and edits libvirt's own output again: libvirt must accept
// every document, keep nkp's metadata and TPM exactly, and keep other applications'
// metadata.
func TestLibvirtRoundTrip(t *testing.T) {
	needLibvirt(t)
	var r [6]byte
	rand.Read(r[:])
	name := "hostdvm-domxml-" + hex.EncodeToString(r[:])
	doc := []byte(`<domain type='qemu'>
  <name>` + name + `</name>
  <metadata>
    <other:x xmlns:other="http://example.com/o">keep &amp; me</other:x>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`)
	t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "undefine", name).Run() })
	file := filepath.Join(t.TempDir(), "d.xml")
	define := func(doc []byte) *Domain {
		t.Helper()
		if err := os.WriteFile(file, doc, 0o600); err != nil {
			t.Fatal(err)
		}
		virsh(t, "define", file)
		dumped := virsh(t, "dumpxml", "--inactive", name)
		d, err := Parse(dumped)
		if err != nil {
			t.Fatalf("Parse of libvirt's dumpxml: %v\n%s", err, dumped)
		}
		if !bytes.Contains(dumped, []byte(`<other:x xmlns:other="http://example.com/o">keep &amp; me</other:x>`)) {
			t.Fatalf("other metadata lost:\n%s", dumped)
		}
		return d
	}
	steps := []struct {
		name string
		m    *Metadata
		tpm  func(uuid string) *TPM
	}{
		{"protect", meta(vtpmA), func(u string) *TPM { e := External("", SocketPath("/run/nkp/vtpm", u)); return &e }},
		{"rekey", meta(Object{Name: ObjectVTPM, KeyID: keyB, KDKID: kdk2, KDKVersion: 2}), func(u string) *TPM { e := External("tpm-crb", SocketPath("/run/nkp/vtpm", u)); return &e }},
		{"unprotect to emulator", nil, func(string) *TPM {
			return &TPM{Model: "tpm-tis", Backend: BackendEmulator, Version: "2.0", EncryptionSecret: "6dd3e4a5-1d76-44ce-961f-f119f5aad935", PersistentState: true}
		}},
		{"adopt emulator", meta(vtpmA), func(u string) *TPM { e := External("tpm-tis", SocketPath("/run/nkp/vtpm", u)); return &e }},
		{"unprotect to none", nil, func(string) *TPM { return nil }},
	}
	cur := define(doc)
	current := virsh(t, "dumpxml", "--inactive", name)
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			want := st.tpm(cur.UUID)
			out, err := SetMetadata(current, st.m)
			if err != nil {
				t.Fatal(err)
			}
			if out, err = SetTPM(out, want); err != nil {
				t.Fatal(err)
			}
			got := define(out)
			if !reflect.DeepEqual(got.Metadata, st.m) {
				t.Fatalf("metadata after define = %+v, want %+v", got.Metadata, st.m)
			}
			tp, err := got.TPM()
			if err != nil {
				t.Fatal(err)
			}
			if (tp == nil) != (want == nil) || tp != nil && *tp != *want {
				t.Fatalf("TPM after define = %+v, want %+v", tp, want)
			}
			if got.UUID != cur.UUID || got.Name != name {
				t.Fatalf("identity changed: %s %s", got.Name, got.UUID)
			}
			current = virsh(t, "dumpxml", "--inactive", name)
		})
	}
}
