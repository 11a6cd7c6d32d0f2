package domxml

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// disks is a domain as libvirt 9.0 dumps it, with the disk kinds nkp meets.
const disks = `<domain type='qemu'>
  <name>vm2</name>
  <uuid>17e545c9-b66d-461a-8ab7-a245ee171814</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/top.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/x.luks'/>
      <target dev='vdb' bus='virtio'/>
      <encryption format='luks' engine='qemu'>
        <secret type='passphrase' uuid='0C0071F2-3576-5478-8f69-436134a43ce9'/>
      </encryption>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/plain.img'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/sdz'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <alias name='sata0-0-0'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='x'><host name='h' port='1'/></source>
      <target dev='vde' bus='virtio'/>
    </disk>
  </devices>
</domain>
`

func TestParseDisks(t *testing.T) {
	d, err := Parse([]byte(disks))
	if err != nil {
		t.Fatal(err)
	}
	want := []Disk{
		{Type: "file", Device: "disk", Target: "vda", Bus: "virtio", Source: "/var/lib/libvirt/images/top.qcow2", DriverName: "qemu", DriverType: "qcow2",
			BackingStore: "/var/lib/libvirt/images/base.qcow2", HasBackingStore: true},
		{Type: "file", Device: "disk", Target: "vdb", Bus: "virtio", Source: "/srv/x.luks", DriverName: "qemu", DriverType: "raw",
			Encryption: &DiskEncryption{Format: "luks", SecretType: "passphrase", SecretUUID: "0c0071f2-3576-5478-8f69-436134a43ce9"}},
		{Type: "file", Device: "disk", Target: "vdc", Bus: "virtio", Source: "/srv/plain.img", Shareable: true},
		{Type: "block", Device: "disk", Target: "vdd", Bus: "virtio", Source: "/dev/sdz", DriverName: "qemu", DriverType: "raw"},
		{Type: "file", Device: "cdrom", Target: "sda", Bus: "sata", DriverName: "qemu", DriverType: "raw", ReadOnly: true, Alias: "sata0-0-0"},
		{Type: "network", Device: "disk", Target: "vde", Bus: "virtio"},
	}
	if !reflect.DeepEqual(d.Disks, want) {
		t.Fatalf("disks =\n%+v\nwant\n%+v", d.Disks, want)
	}
	if dk, ok := d.Disk("vdc"); !ok || dk.Source != "/srv/plain.img" {
		t.Fatalf("Disk(vdc) = %+v, %v", dk, ok)
	}
	if _, ok := d.Disk("vdz"); ok {
		t.Fatal("Disk(vdz) found")
	}
}

func TestParseDisksRefuses(t *testing.T) {
	for name, doc := range map[string]string{
		"two disks one target": `<domain><devices><disk type='file'><target dev='vda'/></disk><disk type='file'><target dev='vda'/></disk></devices></domain>`,
		"bad target":           `<domain><devices><disk type='file'><target dev='../x'/></disk></devices></domain>`,
		"control in source":    "<domain><devices><disk type='file'><source file='/a&#x1;b'/><target dev='vda'/></disk></devices></domain>",
		"too many":             "<domain><devices>" + strings.Repeat("<disk/>", MaxDisks+1) + "</devices></domain>",
	} {
		if _, err := Parse([]byte(doc)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
}

func TestSetDisk(t *testing.T) {
	sec := SecretUUID("17e545c9-b66d-461a-8ab7-a245ee171814", keyA)
	prot := func(src, typ string) DiskEdit { return DiskEdit{Source: src, DriverType: typ, Encryption: LUKS(sec)} }
	tests := []struct {
		name   string
		target string
		edit   DiskEdit
		want   Disk
		gone   []string // substrings that must not be in the result
	}{
		{"qcow2 with chain", "vda", prot("/var/lib/libvirt/images/top.qcow2.nkp-3f1c8a52.qcow2", "qcow2"),
			Disk{Type: "file", Device: "disk", Target: "vda", Bus: "virtio", Source: "/var/lib/libvirt/images/top.qcow2.nkp-3f1c8a52.qcow2", DriverName: "qemu", DriverType: "qcow2", Encryption: LUKS(sec)},
			[]string{"backingStore", "base.qcow2"}},
		{"encrypted at disk level, rekeyed", "vdb", prot("/srv/x.nkp-9a0e7c31.luks", "raw"),
			Disk{Type: "file", Device: "disk", Target: "vdb", Bus: "virtio", Source: "/srv/x.nkp-9a0e7c31.luks", DriverName: "qemu", DriverType: "raw", Encryption: LUKS(sec)},
			[]string{"0C0071F2", "engine="}},
		{"back to plain", "vdb", DiskEdit{Source: "/srv/x.img", DriverType: "raw"},
			Disk{Type: "file", Device: "disk", Target: "vdb", Bus: "virtio", Source: "/srv/x.img", DriverName: "qemu", DriverType: "raw"},
			[]string{"encryption", "secret"}},
		{"no driver, source with children", "vdc", prot("/srv/plain.img.nkp-3f1c8a52.luks", "raw"),
			Disk{Type: "file", Device: "disk", Target: "vdc", Bus: "virtio", Source: "/srv/plain.img.nkp-3f1c8a52.luks", DriverName: "qemu", DriverType: "raw", Shareable: true, Encryption: LUKS(sec)},
			nil},
		{"comma and quote in path", "vdc", prot("/srv/a,b'c.luks", "raw"),
			Disk{Type: "file", Device: "disk", Target: "vdc", Bus: "virtio", Source: "/srv/a,b'c.luks", DriverName: "qemu", DriverType: "raw", Shareable: true, Encryption: LUKS(sec)},
			nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := SetDisk([]byte(disks), tt.target, tt.edit)
			if err != nil {
				t.Fatal(err)
			}
			d, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse of the result: %v\n%s", err, out)
			}
			got, _ := d.Disk(tt.target)
			if !reflect.DeepEqual(*got, tt.want) {
				t.Fatalf("disk =\n%+v\nwant\n%+v\n%s", *got, tt.want, out)
			}
			before, _ := Parse([]byte(disks))
			for i, o := range before.Disks {
				if o.Target != tt.target && !reflect.DeepEqual(o, d.Disks[i]) {
					t.Fatalf("disk %s changed: %+v", o.Target, d.Disks[i])
				}
			}
			// The edited disk's element holds nothing of the old chain or key.
			el := diskElement(t, out, tt.target)
			for _, g := range tt.gone {
				if strings.Contains(el, g) {
					t.Fatalf("%q left in\n%s", g, el)
				}
			}
			mustKeep(t, disks, string(out), "<driver", "<source", "</source>", "backingStore", "<format type='qcow2'/>", "base.qcow2", "<encryption", "<secret", "</encryption>")
			for _, keep := range []string{"<boot order='1'/>", "<seclabel model='dac' relabel='no'/>", "cache='none'"} {
				if strings.Contains(disks, keep) && !strings.Contains(string(out), keep) {
					t.Fatalf("%s lost", keep)
				}
			}
			again, err := SetDisk(out, tt.target, tt.edit)
			if err != nil || !bytes.Equal(again, out) {
				t.Fatalf("second SetDisk changed the document (%v):\n%s\n---\n%s", err, out, again)
			}
		})
	}
}

func diskElement(t *testing.T, doc []byte, target string) string {
	t.Helper()
	l, err := scan(doc)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range l.dom.Disks {
		if d.Target == target {
			return string(doc[l.disks[i].start:l.disks[i].end])
		}
	}
	t.Fatalf("no disk %s", target)
	return ""
}

func TestSetDiskRefuses(t *testing.T) {
	good := DiskEdit{Source: "/srv/n.luks", DriverType: "raw", Encryption: LUKS(keyA)}
	tests := []struct {
		name, target string
		edit         DiskEdit
		want         string
	}{
		{"no such disk", "vdz", good, `no disk with target "vdz"`},
		{"block disk", "vdd", good, `type "block"`},
		{"relative source", "vda", DiskEdit{Source: "n.luks", DriverType: "raw"}, "absolute path"},
		{"driver type", "vda", DiskEdit{Source: "/n", DriverType: "vmdk"}, `not "vmdk"`},
		{"secret", "vda", DiskEdit{Source: "/n", DriverType: "raw", Encryption: LUKS("x")}, `secret "x"`},
		{"format", "vda", DiskEdit{Source: "/n", DriverType: "raw", Encryption: &DiskEncryption{Format: "qcow", SecretType: "passphrase", SecretUUID: keyA}}, "only LUKS"},
	}
	for _, tt := range tests {
		_, err := SetDisk([]byte(disks), tt.target, tt.edit)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want ErrInvalid with %q", tt.name, err, tt.want)
		}
	}
	foreign := strings.Replace(disks, "<driver name='qemu' type='qcow2' cache='none'/>", "<driver xmlns:x='http://x' x:y='1' name='qemu' type='qcow2'/>", 1)
	if _, err := SetDisk([]byte(foreign), "vda", good); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "another namespace") {
		t.Errorf("foreign attribute: err = %v", err)
	}
}
