package domxml

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/google/uuid"
)

const (
	keyA = "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71"
	keyB = "9a0e7c31-2f44-4b19-8d6a-7c5e3b1f0a22"
	kdk1 = "c0ffee00-1111-4222-8333-444455556666"
	kdk2 = "c0ffee00-1111-4222-8333-444455557777"
)

// base is a domain as libvirt 9.0 dumps it, with another application's metadata and a
// comment that must survive every edit.
const base = `<domain type='qemu'>
  <name>vm1</name>
  <uuid>17E545C9-b66d-461a-8ab7-a245ee171814</uuid>
  <metadata>
    <other:x xmlns:other="http://example.com/o">keep &amp; me</other:x>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <!-- a comment -->
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pci-root'/>
  </devices>
</domain>
`

func meta(objs ...Object) *Metadata {
	return &Metadata{ProviderID: "prov-1", Objects: objs}
}

var vtpmA = Object{Name: ObjectVTPM, KeyID: keyA, KDKID: kdk1, KDKVersion: 1}

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		want    Domain
		wantErr string
	}{
		{name: "plain", doc: base, want: Domain{Name: "vm1", UUID: "17e545c9-b66d-461a-8ab7-a245ee171814", Type: "qemu"}},
		{name: "nkp metadata and external tpm", doc: `<domain type='kvm'><name>a</name><uuid>u</uuid><metadata>
<nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="prov-1"><nkp:object name="vtpm" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="1"/></nkp:vm>
</metadata><devices><tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='/run/nkp/vtpm/u.sock'/></backend></tpm></devices></domain>`,
			want: Domain{Name: "a", UUID: "u", Type: "kvm", Metadata: meta(vtpmA),
				TPMs: []TPM{{Model: "tpm-crb", Backend: BackendExternal, SocketPath: "/run/nkp/vtpm/u.sock"}}}},
		{name: "namespace declared on an ancestor, other prefix", doc: `<domain xmlns:q="https://nkp.dev/ns/vm/1"><metadata><q:vm provider="p"><q:object name="disk:vda" key-id="` + keyB + `" kdk-id="` + kdk2 + `" kdk-version="2"/></q:vm></metadata></domain>`,
			want: Domain{Metadata: &Metadata{ProviderID: "p", Objects: []Object{{Name: "disk:vda", KeyID: keyB, KDKID: kdk2, KDKVersion: 2}}}}},
		{name: "emulator tpm with encryption", doc: `<domain><devices><tpm model='tpm-tis'><backend type='emulator' version='2.0' persistent_state='yes'><encryption secret='6DD3E4A5-1d76-44ce-961f-f119f5aad935'/><active_pcr_banks><sha256/></active_pcr_banks></backend></tpm></devices></domain>`,
			want: Domain{TPMs: []TPM{{Model: "tpm-tis", Backend: BackendEmulator, Version: "2.0", PersistentState: true, EncryptionSecret: "6dd3e4a5-1d76-44ce-961f-f119f5aad935", ActivePCRBanks: []string{"sha256"}}}}},
		{name: "vm element in another namespace is not ours", doc: `<domain><metadata><vm xmlns="https://example.com/vm/1" provider=""/></metadata></domain>`, want: Domain{}},
		{name: "not a domain", doc: `<network/>`, wantErr: "root element is <network>"},
		{name: "two roots", doc: `<domain/><domain/>`, wantErr: "more than one root"},
		{name: "empty", doc: ``, wantErr: "no <domain>"},
		{name: "malformed", doc: `<domain><name>x</domain>`, wantErr: "invalid domain XML"},
		{name: "two nkp elements", doc: `<domain><metadata>` + strings.Repeat(`<nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="vtpm" key-id="`+keyA+`" kdk-id="`+kdk1+`" kdk-version="1"/></nkp:vm>`, 2) + `</metadata></domain>`, wantErr: "2 nkp metadata elements"},
		{name: "bad key id", doc: `<domain><name>v</name><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="vtpm" key-id="zz" kdk-id="` + kdk1 + `" kdk-version="1"/></nkp:vm></metadata></domain>`, wantErr: `domain "v": invalid domain XML: nkp metadata: object "vtpm": key ID "zz" is not a UUID`},
		{name: "bad version", doc: `<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="vtpm" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="x"/></nkp:vm></metadata></domain>`, wantErr: `kdk-version "x" is not a number`},
		{name: "vtpm with libvirt secret", doc: `<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="vtpm" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="1" libvirt-secret="6DD3E4A5-1d76-44ce-961f-f119f5aad935"/></nkp:vm></metadata></domain>`,
			want: Domain{Metadata: &Metadata{ProviderID: "p", Objects: []Object{{Name: "vtpm", KeyID: keyA, KDKID: kdk1, KDKVersion: 1, SwtpmSecret: "6dd3e4a5-1d76-44ce-961f-f119f5aad935"}}}}},
		{name: "bad libvirt secret", doc: `<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="vtpm" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="1" libvirt-secret="x"/></nkp:vm></metadata></domain>`, wantErr: `libvirt-secret "x"`},
		{name: "libvirt secret on a disk", doc: `<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"><nkp:object name="disk:vda" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="1" libvirt-secret="6dd3e4a5-1d76-44ce-961f-f119f5aad935"/></nkp:vm></metadata></domain>`, wantErr: "vtpm object only"},
		{name: "no objects", doc: `<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p"/></metadata></domain>`, wantErr: "no protected objects"},
		{name: "no provider", doc: `<domain><metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1"><nkp:object name="vtpm" key-id="` + keyA + `" kdk-id="` + kdk1 + `" kdk-version="1"/></nkp:vm></metadata></domain>`, wantErr: "provider ID"},
		{name: "entity bomb is not expanded", doc: `<!DOCTYPE d [<!ENTITY a "aaaa">]><domain><name>&a;</name></domain>`, wantErr: "invalid domain XML"},
		{name: "too large", doc: "<domain>" + strings.Repeat(" ", MaxSize) + "</domain>", wantErr: "more than the"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.doc))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("Parse error = %v, want one containing %q and wrapping ErrInvalid", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*got, tt.want) {
				t.Fatalf("Parse =\n%+v\nwant\n%+v", *got, tt.want)
			}
		})
	}
}

func TestDomainTPM(t *testing.T) {
	d := Domain{Name: "v", TPMs: []TPM{{Backend: BackendEmulator}, {Backend: BackendPassthrough}}}
	if _, err := d.TPM(); err == nil || !strings.Contains(err.Error(), `domain "v"`) {
		t.Fatalf("two TPMs: err = %v", err)
	}
	d.TPMs = d.TPMs[:1]
	if tp, err := d.TPM(); err != nil || tp.Backend != BackendEmulator {
		t.Fatalf("one TPM: %v %v", tp, err)
	}
	d.TPMs = nil
	if tp, err := d.TPM(); err != nil || tp != nil {
		t.Fatalf("no TPM: %v %v", tp, err)
	}
}

// mustKeep checks that every line of before, except those the edit may touch, is in after.
func mustKeep(t *testing.T, before, after string, touched ...string) {
	t.Helper()
	for _, line := range strings.Split(before, "\n") {
		skip := false
		for _, s := range touched {
			if strings.Contains(line, s) {
				skip = true
			}
		}
		if !skip && !strings.Contains(after, line) {
			t.Errorf("line %q lost:\n%s", line, after)
		}
	}
}

func TestSetMetadata(t *testing.T) {
	two := meta(vtpmA, Object{Name: "disk:vda", KeyID: keyB, KDKID: kdk2, KDKVersion: 2})
	tests := []struct {
		name string
		doc  string
		m    *Metadata
	}{
		{"into existing metadata", base, meta(vtpmA)},
		{"two objects", base, two},
		{"pcr banks kept", base, meta(Object{Name: ObjectVTPM, KeyID: keyB, KDKID: kdk2, KDKVersion: 2, PCRBanks: "sha256,sha384"})},
		{"no metadata element", strings.Replace(base, "<metadata>\n    <other:x xmlns:other=\"http://example.com/o\">keep &amp; me</other:x>\n  </metadata>\n", "", 1), meta(vtpmA)},
		{"self-closing metadata", `<domain><name>x</name><metadata/></domain>`, meta(vtpmA)},
		{"self-closing root", `<domain/>`, meta(vtpmA)},
		{"remove", base, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := SetMetadata([]byte(tt.doc), tt.m)
			if tt.name == "self-closing root" {
				// There is no place for children in <domain/>: nkp refuses rather than guess.
				if err == nil {
					t.Fatalf("SetMetadata on <domain/> = %s, want an error", out)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			d, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse of the result: %v\n%s", err, out)
			}
			if !reflect.DeepEqual(d.Metadata, tt.m) {
				t.Fatalf("metadata read back = %+v, want %+v\n%s", d.Metadata, tt.m, out)
			}
			mustKeep(t, tt.doc, string(out), "<metadata/>")
			// Replacing again gives the same document (idempotent), and removing gives
			// back the original when there was no nkp element before.
			again, err := SetMetadata(out, tt.m)
			if err != nil || !bytes.Equal(again, out) {
				t.Fatalf("second SetMetadata changed the document:\n%s\n---\n%s", out, again)
			}
			removed, err := SetMetadata(out, nil)
			if err != nil {
				t.Fatal(err)
			}
			if d, _ := Parse(removed); d.Metadata != nil {
				t.Fatalf("metadata left after removal:\n%s", removed)
			}
			if tt.name == "into existing metadata" && string(removed) != tt.doc {
				t.Fatalf("removal did not restore the document:\n%q\nwant\n%q", removed, tt.doc)
			}
		})
	}
}

func TestSetMetadataRefusesInvalid(t *testing.T) {
	bad := []*Metadata{
		{ProviderID: "", Objects: []Object{vtpmA}},
		{ProviderID: "p"},
		{ProviderID: "p", Objects: []Object{vtpmA, vtpmA}},
		{ProviderID: "p", Objects: []Object{{Name: "disk:", KeyID: keyA, KDKID: kdk1, KDKVersion: 1}}},
		{ProviderID: "p", Objects: []Object{{Name: "vtpm", KeyID: keyA, KDKID: kdk1, KDKVersion: 0}}},
		{ProviderID: "p\x00", Objects: []Object{vtpmA}},
		{ProviderID: "p", Objects: []Object{{Name: "vtpm", KeyID: keyA, KDKID: kdk1, KDKVersion: 1, PCRBanks: "sha256,md5"}}},
		{ProviderID: "p", Objects: []Object{{Name: "disk:vda", KeyID: keyA, KDKID: kdk1, KDKVersion: 1, PCRBanks: "sha256"}}},
	}
	for _, m := range bad {
		if out, err := SetMetadata([]byte(base), m); err == nil || !errors.Is(err, ErrInvalid) {
			t.Errorf("SetMetadata(%+v) = %s, %v; want ErrInvalid", m, out, err)
		}
	}
}

func TestSetTPM(t *testing.T) {
	ext := External("", "/run/nkp/vtpm/17e545c9-b66d-461a-8ab7-a245ee171814.sock")
	emu := TPM{Model: "tpm-tis", Backend: BackendEmulator, Version: "2.0", EncryptionSecret: "6dd3e4a5-1d76-44ce-961f-f119f5aad935", PersistentState: true}
	withEmu, err := SetTPM([]byte(base), &emu)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		doc  string
		tpm  *TPM
	}{
		{"add external", base, &ext},
		{"add emulator", base, &emu},
		{"emulator with pcr banks", base, &TPM{Backend: BackendEmulator, Version: "2.0", ActivePCRBanks: []string{"sha256", "sha512"}}},
		{"emulator with no pcr bank", base, &TPM{Backend: BackendEmulator, ActivePCRBanks: []string{}}},
		{"replace emulator by external", string(withEmu), &ext},
		{"replace two", strings.Replace(string(withEmu), "</devices>", "<tpm model='spapr-tpm-proxy'><backend type='passthrough'/></tpm></devices>", 1), &ext},
		{"self-closing devices", `<domain><devices/></domain>`, &ext},
		{"no devices", `<domain><name>x</name></domain>`, &ext},
		{"remove", string(withEmu), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := SetTPM([]byte(tt.doc), tt.tpm)
			if err != nil {
				t.Fatal(err)
			}
			d, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse of the result: %v\n%s", err, out)
			}
			got, err := d.TPM()
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if tt.tpm == nil {
				if got != nil {
					t.Fatalf("TPM left after removal: %+v\n%s", got, out)
				}
				if string(out) != base {
					t.Fatalf("removal did not restore the document:\n%q", out)
				}
				return
			}
			if got == nil || !reflect.DeepEqual(got, tt.tpm) {
				t.Fatalf("TPM read back = %+v, want %+v\n%s", got, tt.tpm, out)
			}
			mustKeep(t, tt.doc, string(out), "tpm", "backend", "encryption", "<devices/>", "<name>x</name>")
		})
	}
}

func TestSetTPMRefusesInvalid(t *testing.T) {
	for _, tp := range []TPM{
		{Backend: BackendExternal, SocketPath: "relative.sock"},
		{Backend: BackendPassthrough},
		{Backend: BackendEmulator, EncryptionSecret: "nope"},
		{Backend: BackendEmulator, ActivePCRBanks: []string{"sha256", "x/><evil"}},
	} {
		if _, err := SetTPM([]byte(base), &tp); !errors.Is(err, ErrInvalid) {
			t.Errorf("SetTPM(%+v) err = %v, want ErrInvalid", tp, err)
		}
	}
}

func TestEmulatorStateDir(t *testing.T) {
	tests := []struct {
		tpm  TPM
		want string
	}{
		{TPM{Version: "2.0"}, "/var/lib/libvirt/swtpm/u/tpm2"},
		{TPM{}, "/var/lib/libvirt/swtpm/u/tpm2"},
		{TPM{Version: "1.2"}, "/var/lib/libvirt/swtpm/u/tpm1.2"},
		{TPM{StateDir: "/srv/tpm"}, "/srv/tpm"},
	}
	for _, tt := range tests {
		if got := tt.tpm.EmulatorStateDir(DefaultSwtpmRoot, "u"); got != tt.want {
			t.Errorf("%+v: %q, want %q", tt.tpm, got, tt.want)
		}
	}
}

func TestSecretUUID(t *testing.T) {
	const vm, key = "0b6a1c2e-1111-4222-8333-944455556666", "1c2d3e4f-aaaa-4bbb-8ccc-ddddeeeeffff"
	a := SecretUUID(vm, key)
	if b := SecretUUID(strings.ToUpper(vm), strings.ToUpper(key)); a != b {
		t.Fatalf("SecretUUID depends on case: %s vs %s", a, b)
	}
	if _, err := uuid.Parse(a); err != nil || len(a) != 36 {
		t.Fatalf("SecretUUID = %q: not a canonical UUID (%v)", a, err)
	}
	for _, other := range []string{SecretUUID(key, vm), SecretUUID(vm, vm), SecretUUID(key, key)} {
		if other == a {
			t.Fatalf("SecretUUID(%s, %s) collides with a different pair", vm, key)
		}
	}
	// Pinned: hosts of one cluster must agree, across versions of nkp.
	if want := "0c0071f2-3576-5478-8f69-436134a43ce9"; a != want {
		t.Fatalf("SecretUUID = %s, want %s: changing it strands every protected disk's secret", a, want)
	}
}

// TestFirmwareKept: protect's and unprotect's edits of a UEFI domain (as libvirt 9.0
// dumps the two forms: an explicit OVMF loader with an NVRAM template, and firmware
// autoselection with the secure-boot feature) leave <os> and <features> byte for byte.
func TestFirmwareKept(t *testing.T) {
	const explicit = `  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <smm state='on'/>
  </features>
`
	const auto = `  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <firmware>
      <feature enabled='yes' name='enrolled-keys'/>
      <feature enabled='yes' name='secure-boot'/>
    </firmware>
    <loader secure='yes'/>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <smm state='on'/>
  </features>
`
	const crb = `    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'/>
    </tpm>
`
	ext := External("tpm-crb", "/run/nkp/vtpm/17e545c9-b66d-461a-8ab7-a245ee171814.sock")
	emu := TPM{Model: "tpm-crb", Backend: BackendEmulator, Version: "2.0"}
	for _, fw := range []struct{ name, xml string }{{"explicit loader", explicit}, {"autoselection", auto}} {
		for _, tpm := range []struct{ name, xml string }{{"no TPM", ""}, {"libvirt's swtpm", crb}} {
			doc := strings.Replace(strings.Replace(base, "  <!-- a comment -->\n", "  <!-- a comment -->\n"+fw.xml, 1),
				"  </devices>", tpm.xml+"  </devices>", 1)
			steps := []struct {
				name string
				edit func([]byte) ([]byte, error)
			}{
				{"protect: metadata", func(b []byte) ([]byte, error) { return SetMetadata(b, meta(vtpmA)) }},
				{"protect: external TPM", func(b []byte) ([]byte, error) { return SetTPM(b, &ext) }},
				{"rekey: metadata", func(b []byte) ([]byte, error) {
					return SetMetadata(b, meta(Object{Name: ObjectVTPM, KeyID: keyB, KDKID: kdk2, KDKVersion: 2}))
				}},
				{"unprotect: libvirt's swtpm", func(b []byte) ([]byte, error) { return SetTPM(b, &emu) }},
				{"unprotect: metadata removed", func(b []byte) ([]byte, error) { return SetMetadata(b, nil) }},
				{"unprotect: no TPM", func(b []byte) ([]byte, error) { return SetTPM(b, nil) }},
			}
			out := []byte(doc)
			for _, st := range steps {
				var err error
				if out, err = st.edit(out); err != nil {
					t.Fatalf("%s, %s, %s: %v", fw.name, tpm.name, st.name, err)
				}
				if !bytes.Contains(out, []byte(fw.xml)) {
					t.Errorf("%s, %s, %s: <os> or <features> changed:\n%s", fw.name, tpm.name, st.name, out)
				}
			}
		}
	}
}
