package domxml

import (
	"reflect"
	"testing"
)

// FuzzParse feeds untrusted domain XML (a hook's stdin, a user's definition) to Parse,
// and checks that whatever Parse accepts, the writers keep readable: the metadata and TPM
// written into it read back as written.
func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	f.Add([]byte(`<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="vtpm" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="1"/></nkp:vm></metadata><devices><tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='/run/nkp/vtpm/u.sock'/></backend></tpm></devices></domain>`))
	f.Add([]byte(`<domain><devices/><metadata/></domain>`))
	f.Add([]byte(disks))
	f.Fuzz(func(t *testing.T, doc []byte) {
		d, err := Parse(doc)
		if err != nil {
			return
		}
		m := meta(vtpmA)
		out, err := SetMetadata(doc, m)
		if err != nil {
			return // e.g. <domain/>
		}
		ext := External("", "/run/nkp/vtpm/x.sock")
		if out, err = SetTPM(out, &ext); err != nil {
			t.Fatalf("SetTPM after SetMetadata: %v\n%q", err, out)
		}
		d2, err := Parse(out)
		if err != nil {
			t.Fatalf("Parse of the edited document: %v\n%q\n->\n%q", err, doc, out)
		}
		if !reflect.DeepEqual(d2.Metadata, m) {
			t.Fatalf("metadata = %+v, want %+v\n%q", d2.Metadata, m, out)
		}
		if tp, err := d2.TPM(); err != nil || tp == nil || !reflect.DeepEqual(*tp, ext) {
			t.Fatalf("TPM = %+v, %v\n%q", tp, err, out)
		}
		if d2.Name != d.Name || d2.UUID != d.UUID {
			t.Fatalf("identity changed: %q/%q -> %q/%q", d.Name, d.UUID, d2.Name, d2.UUID)
		}
		back, err := SetMetadata(out, nil)
		if err != nil {
			t.Fatal(err)
		}
		if d3, err := Parse(back); err != nil || d3.Metadata != nil {
			t.Fatalf("after removal: %+v, %v", d3, err)
		}
	})
}

// FuzzEdit feeds domain XML to SetDisk: whatever Parse accepts, protecting a file disk
// and taking it back to plain must give documents Parse reads back with that disk as
// written, the same number of disks, and every other disk unchanged.
func FuzzEdit(f *testing.F) {
	f.Add([]byte(disks), "vda", "/srv/n.qcow2")
	f.Add([]byte(disks), "vdc", "/srv/a,b'c&d.luks")
	f.Add([]byte(`<domain><devices><disk type='file'><target dev='vda'/></disk></devices></domain>`), "vda", "/x")
	f.Add([]byte(`<domain><devices><disk type='file'><source file='/a'><encryption format='luks'/></source><encryption format='qcow'/><target dev='vda'/><backingStore/></disk></devices></domain>`), "vda", "/y")
	f.Fuzz(func(t *testing.T, doc []byte, target, src string) {
		d, err := Parse(doc)
		if err != nil {
			return
		}
		for _, e := range []DiskEdit{
			{Source: src, DriverType: "qcow2", Encryption: LUKS(keyA)},
			{Source: src, DriverType: "raw"},
		} {
			out, err := SetDisk(doc, target, e)
			if err != nil {
				continue
			}
			d2, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse of the edited document: %v\n%q\n->\n%q", err, doc, out)
			}
			if len(d2.Disks) != len(d.Disks) || d2.Name != d.Name || d2.UUID != d.UUID {
				t.Fatalf("disks %d -> %d, identity %q/%q -> %q/%q\n%q", len(d.Disks), len(d2.Disks), d.Name, d.UUID, d2.Name, d2.UUID, out)
			}
			for i, o := range d.Disks {
				n := d2.Disks[i]
				if o.Target != target {
					if !reflect.DeepEqual(o, n) {
						t.Fatalf("disk %d changed: %+v -> %+v\n%q", i, o, n, out)
					}
					continue
				}
				if n.Source != e.Source || n.DriverType != e.DriverType || !reflect.DeepEqual(n.Encryption, e.Encryption) || n.HasBackingStore || n.Type != "file" {
					t.Fatalf("edited disk = %+v, want %+v\n%q", n, e, out)
				}
			}
			// Again: the same disks (byte-equal only for libvirt's own layout, TestSetDisk).
			again, err := SetDisk(out, target, e)
			if err != nil {
				t.Fatalf("second SetDisk: %v\n%q", err, out)
			}
			if d3, err := Parse(again); err != nil || !reflect.DeepEqual(d3.Disks, d2.Disks) {
				t.Fatalf("second SetDisk changed the disks (%v)\n%q\n%q", err, out, again)
			}
		}
	})
}
