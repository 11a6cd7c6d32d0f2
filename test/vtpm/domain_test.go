package vtpm

import (
	"bytes"
	"encoding/xml"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"text/template"

	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/guest/guesttest"
)

// domainSpec is a TCG domain booting the test guest, its serial console in a file and a
// vTPM on tpm-crb: an external backend the test started (Socket), or libvirt's own swtpm
// with its state encrypted under a libvirt secret (Secret).
type domainSpec struct {
	Name    string
	UUID    string // "": libvirt makes one
	Kernel  string
	Initrd  string
	Cmdline string
	Console string
	Socket  string // <backend type='external'>: the backend's control socket
	Secret  string // <backend type='emulator'>: the UUID of the secret; wins over Socket
}

// domainXML is the XML of a domainSpec.
var domainXML = template.Must(template.New("domain").Funcs(template.FuncMap{"x": xmlEscape}).Parse(`<domain type='qemu'>
  <name>{{x .Name}}</name>
{{- if .UUID}}
  <uuid>{{x .UUID}}</uuid>
{{- end}}
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{{x .Kernel}}</kernel>
    <initrd>{{x .Initrd}}</initrd>
    <cmdline>{{x .Cmdline}}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{{x .Console}}'/><target port='0'/></serial>
    <console type='file'><source path='{{x .Console}}'/><target type='serial' port='0'/></console>
    <tpm model='tpm-crb'>
{{- if .Secret}}
      <backend type='emulator' version='2.0'><encryption secret='{{x .Secret}}'/></backend>
{{- else}}
      <backend type='external'><source type='unix' mode='connect' path='{{x .Socket}}'/></backend>
{{- end}}
    </tpm>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`))

// xmlEscape escapes s for XML text and for attribute values in single quotes.
func xmlEscape(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}

// xml renders the domain's XML.
func (d domainSpec) xml(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := domainXML.Execute(&buf, d); err != nil {
		t.Fatalf("domain XML of %s: %v", d.Name, err)
	}
	return buf.Bytes()
}

// write writes the domain's XML to dir/domain.xml for virsh and returns its path.
func (d domainSpec) write(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(p, d.xml(t), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// copyGuest copies the guest's kernel and initrd into dir (libvirt relabels them, so the
// shared cache is left alone) and returns the copies.
func copyGuest(t *testing.T, a guest.Artifacts, dir string) (kernel, initrd string) {
	t.Helper()
	kernel, initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.gz")
	guesttest.CopyFile(t, a.Kernel, kernel)
	guesttest.CopyFile(t, a.Initrd, initrd)
	return kernel, initrd
}

// TestDomainXML renders both kinds of vTPM and reads the XML back as libvirt would: the
// values survive escaping, and only the chosen backend is there.
func TestDomainXML(t *testing.T) {
	type parsed struct {
		Name    string `xml:"name"`
		UUID    string `xml:"uuid"`
		Kernel  string `xml:"os>kernel"`
		Cmdline string `xml:"os>cmdline"`
		Serial  struct {
			Path string `xml:"path,attr"`
		} `xml:"devices>serial>source"`
		Backends []struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Path string `xml:"path,attr"`
			} `xml:"source"`
			Encryption struct {
				Secret string `xml:"secret,attr"`
			} `xml:"encryption"`
		} `xml:"devices>tpm>backend"`
	}
	base := domainSpec{
		Name: "nkp-<a&b>", Kernel: "/k'1", Initrd: "/i", Cmdline: `console=ttyS0 nkp.nv="x y"&z`,
		Console: "/c/console.log",
	}
	external, emulator := base, base
	external.Socket = "/s/tpm's.sock"
	emulator.UUID, emulator.Secret = "0b6f3c7e-0000-4000-8000-000000000001", "0b6f3c7e-0000-4000-8000-000000000002"
	tests := []struct {
		name         string
		spec         domainSpec
		backend      string
		socket, uuid string
		secret       string
	}{
		{"external", external, "external", external.Socket, "", ""},
		{"emulator", emulator, "emulator", "", emulator.UUID, emulator.Secret},
	}
	for _, tt := range tests {
		var got parsed
		if err := xml.Unmarshal(tt.spec.xml(t), &got); err != nil {
			t.Fatalf("%s: the XML does not parse: %v", tt.name, err)
		}
		if got.Name != tt.spec.Name || got.Kernel != tt.spec.Kernel || got.Cmdline != tt.spec.Cmdline || got.Serial.Path != tt.spec.Console {
			t.Errorf("%s: read back name %q kernel %q cmdline %q console %q, want %q %q %q %q", tt.name,
				got.Name, got.Kernel, got.Cmdline, got.Serial.Path, tt.spec.Name, tt.spec.Kernel, tt.spec.Cmdline, tt.spec.Console)
		}
		if got.UUID != tt.uuid {
			t.Errorf("%s: uuid %q, want %q", tt.name, got.UUID, tt.uuid)
		}
		if len(got.Backends) != 1 {
			t.Fatalf("%s: %d TPM backends, want 1", tt.name, len(got.Backends))
		}
		be := got.Backends[0]
		if be.Type != tt.backend || be.Source.Path != tt.socket || be.Encryption.Secret != tt.secret {
			t.Errorf("%s: backend type %q socket %q secret %q, want %q %q %q", tt.name,
				be.Type, be.Source.Path, be.Encryption.Secret, tt.backend, tt.socket, tt.secret)
		}
	}
}
