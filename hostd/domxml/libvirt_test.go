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
			return &TPM{Model: "tpm-tis", Backend: BackendEmulator, Version: "2.0", EncryptionSecret: "6dd3e4a5-1d76-44ce-961f-f119f5aad935", PersistentState: true,
				ActivePCRBanks: []string{"sha256", "sha384"}}
		}},
		{"adopt emulator", meta(Object{Name: ObjectVTPM, KeyID: keyB, KDKID: kdk2, KDKVersion: 2, PCRBanks: "sha256,sha384"}), func(u string) *TPM { e := External("tpm-tis", SocketPath("/run/nkp/vtpm", u)); return &e }},
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
			if (tp == nil) != (want == nil) || tp != nil && !reflect.DeepEqual(tp, want) {
				t.Fatalf("TPM after define = %+v, want %+v", tp, want)
			}
			if got.UUID != cur.UUID || got.Name != name {
				t.Fatalf("identity changed: %s %s", got.Name, got.UUID)
			}
			current = virsh(t, "dumpxml", "--inactive", name)
		})
	}
}

// TestLibvirtDisks defines what SetDisk writes (protected qcow2 and raw LUKS disks, a
// backing chain dropped, then back to plain) with the real libvirtd and reads it back:
// libvirt must accept it and dump the same disks, and the untouched disk must stay.
func TestLibvirtDisks(t *testing.T) {
	needLibvirt(t)
	var r [6]byte
	rand.Read(r[:])
	name := "hostdvm-domxml-" + hex.EncodeToString(r[:])
	doc := []byte(`<domain type='qemu'>
  <name>` + name + `</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/nkp-test/top.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/nkp-test/base.qcow2'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/nkp-test/data.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`)
	t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "undefine", name).Run() })
	file := filepath.Join(t.TempDir(), "d.xml")
	define := func(doc []byte) (*Domain, []byte) {
		t.Helper()
		if err := os.WriteFile(file, doc, 0o600); err != nil {
			t.Fatal(err)
		}
		virsh(t, "define", file)
		dumped := virsh(t, "dumpxml", "--inactive", "--security-info", name)
		d, err := Parse(dumped)
		if err != nil {
			t.Fatalf("Parse of libvirt's dumpxml: %v\n%s", err, dumped)
		}
		return d, dumped
	}
	cur, current := define(doc)
	cdrom, _ := cur.Disk("sda")
	sec := SecretUUID(cur.UUID, keyA)
	steps := []struct {
		name  string
		edits map[string]DiskEdit
	}{
		{"protect", map[string]DiskEdit{
			"vda": {Source: "/var/lib/nkp-test/top.qcow2.nkp-3f1c8a52.qcow2", DriverType: "qcow2", Encryption: LUKS(sec)},
			"vdb": {Source: "/var/lib/nkp-test/data.img.nkp-3f1c8a52.luks", DriverType: "raw", Encryption: LUKS(sec)},
		}},
		{"rekey deep", map[string]DiskEdit{
			"vdb": {Source: "/var/lib/nkp-test/data.img.nkp-9a0e7c31.luks", DriverType: "raw", Encryption: LUKS(SecretUUID(cur.UUID, keyB))},
		}},
		{"unprotect", map[string]DiskEdit{
			"vda": {Source: "/var/lib/nkp-test/top.qcow2.nkp-plain.qcow2", DriverType: "qcow2"},
			"vdb": {Source: "/var/lib/nkp-test/data.img.nkp-plain.raw", DriverType: "raw"},
		}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			out := current
			for target, e := range st.edits {
				var err error
				if out, err = SetDisk(out, target, e); err != nil {
					t.Fatal(err)
				}
			}
			got, dumped := define(out)
			for target, e := range st.edits {
				dk, ok := got.Disk(target)
				if !ok || dk.Source != e.Source || dk.DriverType != e.DriverType || !reflect.DeepEqual(dk.Encryption, e.Encryption) || dk.HasBackingStore {
					t.Fatalf("disk %s after define = %+v, want %+v\n%s", target, dk, e, dumped)
				}
			}
			if dk, _ := got.Disk("sda"); !reflect.DeepEqual(dk, cdrom) {
				t.Fatalf("cdrom changed: %+v", dk)
			}
			if !bytes.Contains(dumped, []byte("<boot order='1'/>")) || !bytes.Contains(dumped, []byte("cache='none'")) {
				t.Fatalf("other disk settings lost:\n%s", dumped)
			}
			current = dumped
		})
	}
}
