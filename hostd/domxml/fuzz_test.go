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
		if tp, err := d2.TPM(); err != nil || tp == nil || *tp != ext {
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
