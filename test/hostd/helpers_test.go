package hostd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"text/template"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/guest/guesttest"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// Timeouts are generous: the machine is shared and QEMU runs without KVM.
const bootTimeout = 4 * time.Minute // start to the agent's line

func TestMain(m *testing.M) { e2e.Main(m) }

// requireHosts checks what every test here needs: root, the namespace and libvirt
// tools, QEMU and the guest builder's tools; it returns the guest, built once.
func requireHosts(t *testing.T) guest.Artifacts {
	t.Helper()
	return guesttest.Require(t, libvirtns.Tools...)
}

// testLog collects the output of a host's daemons and shows it when the test fails.
type testLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b []byte
	for _, line := range bytes.SplitAfter(l.buf.Bytes(), []byte("\n")) {
		if !bytes.Contains(line, []byte("virNetDevSendEthtoolIoctl")) { // libvirtd's noise in a netns
			b = append(b, line...)
		}
	}
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(b)
}

// newHost starts a private libvirtd named name with nkp's /run/nkp and /var/lib/nkp of
// its own; Cleanup closes it and fails the test if anything is left.
func newHost(t *testing.T, name string, hooks map[string][]byte) *libvirtns.Host {
	t.Helper()
	if err := libvirtns.RemoveStale(); err != nil {
		t.Log(err)
	}
	log := &testLog{}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h, err := libvirtns.Start(ctx, libvirtns.Config{
		Name: name, Private: []string{"/run/nkp", "/var/lib/nkp", "/etc/nkp"}, Hooks: hooks, Log: log,
	})
	if err != nil {
		t.Fatalf("host %s: %v", name, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- host %s: libvirtd and virtlogd ---\n%s", name, log.String())
		}
		if err := h.Close(); err != nil {
			t.Errorf("close host %s: %v", name, err)
		}
		if pids, _ := h.Pids(); len(pids) > 0 {
			t.Errorf("host %s: processes %v still run in its namespace after Close", name, pids)
		}
		if _, err := os.Stat("/run/netns/" + h.NetNS); err == nil {
			t.Errorf("host %s: network namespace %s still exists after Close", name, h.NetNS)
		}
	})
	return h
}

// link joins two hosts for migration traffic on subnet 10.77.n.0/24.
func link(t *testing.T, a, b *libvirtns.Host, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := libvirtns.Link(ctx, a, b, n); err != nil {
		t.Fatal(err)
	}
}

// virsh runs virsh on h and fails the test on error.
func virsh(t *testing.T, h *libvirtns.Host, args ...string) string {
	t.Helper()
	out, err := h.Virsh(context.Background(), args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// vmFiles is one VM's files outside any host: kernel, initrd and the console, in a
// directory QEMU's user may traverse, seen under the same path by every host.
type vmFiles struct {
	dir, kernel, initrd string
	console             console
}

func newVMFiles(t *testing.T, a guest.Artifacts) vmFiles {
	t.Helper()
	d := e2e.TraversableDir(t, "nkp-hostd-vm-")
	f := vmFiles{dir: d, kernel: filepath.Join(d, "vmlinuz"), initrd: filepath.Join(d, "initrd.gz"), console: console(filepath.Join(d, "console.log"))}
	copyTo(t, a.Kernel, f.kernel)
	copyTo(t, a.Initrd, f.initrd)
	return f
}

// copyTo is guesttest.CopyFile under the name this package's tests use.
var copyTo = guesttest.CopyFile

// domainSpec is a TCG domain booting the test guest with its console appended to a
// file (a restore or migration keeps the earlier lines). TPM is "" (none), "emulator"
// (libvirt's own swtpm) or a socket path (an external backend).
type domainSpec struct {
	Name, UUID              string
	Kernel, Initrd, Cmdline string
	Console                 string
	TPM                     string
	TPMModel                string     // "" is tpm-tis
	PCRBanks                []string   // the emulator's <active_pcr_banks>; nil: none
	Disks                   []diskSpec // virtio disks, in order
	UEFI                    *uefiSpec  // nil: machine pc with SeaBIOS
	// Reboot makes a reset reboot the guest (<on_reboot>restart); otherwise the domain
	// is destroyed, also by virsh reset (libvirt runs QEMU with -no-reboot).
	Reboot bool
}

// uefiSpec makes a domain a q35 machine with OVMF: either libvirt's autoselection
// (<os firmware='efi'>) or an explicit <loader> and <nvram> with a template.
type uefiSpec struct {
	Auto       bool   // <os firmware='efi'>
	SecureBoot bool   // auto: <firmware><feature enabled='yes' name='secure-boot'/>; explicit: secure='yes'; both: <smm state='on'/>
	Loader     string // explicit: the code image (read-only pflash)
	Template   string // explicit: the variables template
	NVRAM      string // explicit: the domain's variables file
}

// diskSpec is one file-backed virtio disk of a test domain.
type diskSpec struct {
	Dev    string // target: vda, vdb, ...
	Format string // driver type: raw or qcow2
	File   string
}

var domainXML = template.Must(template.New("domain").Funcs(template.FuncMap{"x": xmlEscape}).Parse(`<domain type='qemu'>
  <name>{{x .Name}}</name>
{{- if .UUID}}
  <uuid>{{x .UUID}}</uuid>
{{- end}}
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os{{with .UEFI}}{{if .Auto}} firmware='efi'{{end}}{{end}}>
    <type arch='x86_64' machine='{{if .UEFI}}q35{{else}}pc{{end}}'>hvm</type>
{{- with .UEFI}}
{{- if and .Auto .SecureBoot}}
    <firmware><feature enabled='yes' name='secure-boot'/></firmware>
{{- end}}
{{- if .Loader}}
    <loader readonly='yes' secure='{{if .SecureBoot}}yes{{else}}no{{end}}' type='pflash'>{{x .Loader}}</loader>
    <nvram template='{{x .Template}}'>{{x .NVRAM}}</nvram>
{{- end}}
{{- end}}
    <kernel>{{x .Kernel}}</kernel>
    <initrd>{{x .Initrd}}</initrd>
    <cmdline>{{x .Cmdline}}</cmdline>
  </os>
  <features><acpi/><apic/>{{with .UEFI}}{{if .SecureBoot}}<smm state='on'/>{{end}}{{end}}</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>{{if .Reboot}}restart{{else}}destroy{{end}}</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{{x .Console}}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='{{x .Console}}' append='on'/><target type='serial' port='0'/></console>
{{- if eq .TPM "emulator"}}
    <tpm model='{{if .TPMModel}}{{x .TPMModel}}{{else}}tpm-tis{{end}}'><backend type='emulator' version='2.0'>{{if .PCRBanks}}<active_pcr_banks>{{range .PCRBanks}}<{{x .}}/>{{end}}</active_pcr_banks>{{end}}</backend></tpm>
{{- else if .TPM}}
    <tpm model='{{if .TPMModel}}{{x .TPMModel}}{{else}}tpm-tis{{end}}'><backend type='external'><source type='unix' mode='connect' path='{{x .TPM}}'/></backend></tpm>
{{- end}}
{{- range .Disks}}
    <disk type='file' device='disk'><driver name='qemu' type='{{x .Format}}'/><source file='{{x .File}}'/><target dev='{{x .Dev}}' bus='virtio'/></disk>
{{- end}}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`))

func xmlEscape(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}

// noTimerCheck keeps the guest kernel from panicking in setup_IO_APIC ("IO-APIC + timer
// doesn't work") when TCG runs slowly on a loaded machine.
const noTimerCheck = " no_timer_check"

// newDomain is the spec of a domain booting f with cfg; name gets a random suffix.
func newDomain(t *testing.T, f vmFiles, name string, cfg guest.Config, tpm string) domainSpec {
	t.Helper()
	args, err := cfg.KernelArgs()
	if err != nil {
		t.Fatal(err)
	}
	return domainSpec{Name: "nkp-hostd-" + name + "-" + randHex(t, 4), Kernel: f.kernel, Initrd: f.initrd,
		Cmdline: args + noTimerCheck, Console: string(f.console), TPM: tpm}
}

// write writes the domain's XML into dir and returns its path.
func (d domainSpec) write(t *testing.T, dir string) string {
	t.Helper()
	var buf bytes.Buffer
	if err := domainXML.Execute(&buf, d); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, d.Name+".xml")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// define defines d on h; Cleanup destroys and undefines it (with libvirt's TPM state).
func define(t *testing.T, h *libvirtns.Host, d domainSpec, dir string) {
	t.Helper()
	virsh(t, h, "define", d.write(t, dir))
	t.Cleanup(func() {
		ctx := context.Background()
		h.Virsh(ctx, "destroy", d.Name)
		h.Virsh(ctx, "undefine", d.Name, "--tpm")
	})
}

// state returns the domain's state as virsh domstate prints it ("" when h has no such
// domain).
func state(h *libvirtns.Host, name string) string {
	out, err := h.Virsh(context.Background(), "domstate", name)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(out)
}

// console reads a serial console file as the guest writes it.
type console string

func (c console) records() []guest.Record { return guesttest.ConsoleRecords(string(c)) }

func (c console) tail() string { return guesttest.ConsoleTail(string(c)) }

// waitFor polls the console until cond holds on its records, the agent fails, or
// bootTimeout passes; it returns the records.
func (c console) waitFor(t *testing.T, what string, cond func([]guest.Record) bool) []guest.Record {
	t.Helper()
	var recs []guest.Record
	failed := false
	err := e2e.Poll(bootTimeout, func() bool {
		recs = c.records()
		if cond(recs) {
			return true
		}
		if v, _ := guest.Last(recs, "done"); v == "fail" {
			failed = true
			return true
		}
		return false
	})
	if failed {
		t.Fatalf("waiting for the guest to print %s: the agent failed\n%s", what, c.tail())
	}
	if err != nil {
		t.Fatalf("waiting for the guest to print %s: %v\n%s", what, err, c.tail())
	}
	return recs
}

// loopIndex is the number of the last loop line (-1 when there is none).
func loopIndex(recs []guest.Record) int {
	n := -1
	for _, r := range recs {
		if v, ok := r["loop"]; ok {
			var i int
			if _, err := fmt.Sscan(v, &i); err == nil {
				n = i
			}
		}
	}
	return n
}

// waitLoopAfter waits for a loop line numbered above n: the guest runs (again).
func (c console) waitLoopAfter(t *testing.T, n int) []guest.Record {
	t.Helper()
	return c.waitFor(t, fmt.Sprintf("a loop line after #%d", n), func(r []guest.Record) bool { return loopIndex(r) > n })
}

// loopConfig writes nv to NV, extends PCR16 with extend, then prints PCR0, PCR16 and
// the NV value every second for ten minutes.
func loopConfig(nv, extend string) guest.Config {
	return guest.Config{Actions: []string{guest.ActionNVWrite, guest.ActionExtend, guest.ActionLoop}, NV: nv, Extend: extend, Loop: 600}
}

// tpmView is what the loop guest reports about its TPM.
type tpmView struct{ pcr0, pcr16, nv string }

func lastView(recs []guest.Record) tpmView {
	var v tpmView
	v.pcr0, _ = guest.Last(recs, "pcr0")
	v.pcr16, _ = guest.Last(recs, "pcr16")
	v.nv, _ = guest.Last(recs, "nv")
	return v
}

// checkView fails the test unless the guest's TPM shows a firmware PCR0, an extended
// PCR16 and NV value nv.
func checkView(t *testing.T, what string, v tpmView, nv string) {
	t.Helper()
	if len(v.pcr0) != 64 || v.pcr0 == strings.Repeat("0", 64) {
		t.Errorf("%s: PCR0 %q, want a firmware measurement", what, v.pcr0)
	}
	if len(v.pcr16) != 64 || v.pcr16 == strings.Repeat("0", 64) {
		t.Errorf("%s: PCR16 %q, want the extended value", what, v.pcr16)
	}
	if v.nv != nv {
		t.Errorf("%s: NV %q, want %q", what, v.nv, nv)
	}
}

// uplink joins h to the root network namespace on subnet 10.78.n.0/24 (see
// libvirtns.Uplink): servers there, such as the provider, are reachable from h.
func uplink(t *testing.T, h *libvirtns.Host, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := libvirtns.Uplink(ctx, h, n); err != nil {
		t.Fatal(err)
	}
}
