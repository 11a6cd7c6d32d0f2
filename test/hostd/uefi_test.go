package hostd

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// OVMF as Debian's ovmf package installs it (test/setup.sh).
const (
	ovmfSecbootCode = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
	ovmfMSVars      = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
)

// TestUEFI protects q35 domains that boot OVMF with Secure Boot — the firmware a
// Windows 11 or measured-boot Linux guest needs — as an operator would: one with an
// explicit <loader>/<nvram template> and libvirt's own swtpm (tpm-tis) adopted by
// protect, one with libvirt's firmware autoselection (<os firmware='efi'> and the
// secure-boot feature) and no TPM, which protect gives nkp's default tpm-crb. The test
// kernel boots directly (-kernel) under OVMF through its EFI stub. Each guest must see
// its TPM with the firmware's measurements in it (PCR 0 not zero and equal to PCR 0
// replayed from the event log OVMF handed the kernel), the adopted one the same EK and
// NV as under libvirt's swtpm, the new one its NV after a stop and start and, as
// swtpm_setup manufactured it, only the banks of its <active_pcr_banks> (sha256,
// sha384) and an RSA EK certificate; `nkpctl vm status` says ok while it runs. The
// adopted one asks for banks sha1,sha256, and after unprotect --tpm keep its definition
// has the same <active_pcr_banks> as before protect and the guest sees the same banks.
// protect, rekey and unprotect leave the firmware configuration (<os firmware>,
// <loader>, <nvram>, <firmware>, <smm>) byte for byte and the NVRAM file untouched.
func TestUEFI(t *testing.T) {
	a := requireHosts(t)
	for _, f := range []string{ovmfSecbootCode, ovmfMSVars} {
		if _, err := os.Stat(f); err != nil {
			e2e.Unavailable(t, fmt.Sprintf("no OVMF (install Debian's ovmf with `make setup`): %v", err))
		}
	}
	bins := buildNKP(t)
	h := newHost(t, "uefi", hookFiles(t))
	uplink(t, h, 68)
	p := startProvider(t, h.Gateway)
	d := joinHost(t, h, p, startHostTPM(t, bins.swtpm), bins, "--sync-interval", "2s")

	cases := []struct {
		name      string
		uefi      func(f vmFiles) *uefiSpec
		model     string // the domain's TPM before protect: libvirt's swtpm of this model
		banks     []string
		booted    bool   // booted with libvirt's swtpm before protect: protect adopts its state
		reset     bool   // virsh reset while the protected VM runs (a reboot: QEMU resets the vTPM)
		unprotect string // vmapi.UnprotectKeep or vmapi.UnprotectNone
		nvram     func(h *libvirtns.Host, name string, f vmFiles) string
	}{
		{
			// What virt-install --boot uefi --tpm default gives a Windows 11 guest.
			name: "firmware autoselection with secure-boot, libvirt swtpm tpm-crb adopted",
			uefi: func(vmFiles) *uefiSpec { return &uefiSpec{Auto: true, SecureBoot: true} },
			// Banks other than swtpm_setup's default (sha256), that unprotect must give back.
			model: "tpm-crb", banks: []string{"sha1", "sha256"}, booted: true, reset: true, unprotect: vmapi.UnprotectKeep,
			nvram: func(h *libvirtns.Host, name string, _ vmFiles) string {
				return h.Path("/var/lib/libvirt/qemu/nvram/" + name + "_VARS.fd")
			},
		},
		{
			name: "explicit loader and nvram template, tpm-tis never started",
			uefi: func(f vmFiles) *uefiSpec {
				return &uefiSpec{SecureBoot: true, Loader: ovmfSecbootCode, Template: ovmfMSVars, NVRAM: filepath.Join(f.dir, "VARS.fd")}
			},
			model: "tpm-tis", unprotect: vmapi.UnprotectNone, banks: []string{"sha256", "sha384"},
			nvram: func(_ *libvirtns.Host, _ string, f vmFiles) string { return filepath.Join(f.dir, "VARS.fd") },
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			vm := newNKPVM(t, a, "uefi", protection{})
			vm.spec.UEFI = tc.uefi(vm.f)
			vm.spec.TPM, vm.spec.TPMModel, vm.spec.PCRBanks = "emulator", tc.model, tc.banks
			vm.spec.Reboot = tc.reset
			nvram := tc.nvram(h, vm.spec.Name, vm.f)
			boot := func(what string, cfg guest.Config) []guest.Record {
				t.Helper()
				setJob(t, h, vm.spec.Name, cfg)
				recs := vm.boot(t, h)
				wantFirmwareMeasured(t, what, recs)
				return recs
			}

			var ek, banks string
			vm.definePlain(t, h, guest.Config{})
			t.Cleanup(func() { // before vm's own clean-up, whose undefine refuses a domain with NVRAM
				h.Virsh(context.Background(), "destroy", vm.spec.Name)
				h.Virsh(context.Background(), "undefine", "--nvram", "--tpm", vm.spec.Name)
			})
			if tc.booted {
				recs := boot("boot with libvirt's swtpm", guest.Config{Actions: []string{guest.ActionEK, guest.ActionNVWrite}, NV: "nv-uefi-libvirt"})
				wantNV(t, "boot with libvirt's swtpm", recs, "nv-uefi-libvirt")
				ek = ekOf(recs)
				banks, _ = guest.Last(recs, "pcr-banks")
				if want := strings.Join(tc.banks, ","); banks != want {
					t.Errorf("under libvirt's swtpm the guest sees PCR banks %q, want %q as the domain's <active_pcr_banks> asks", banks, want)
				}
			}
			pcrBanks := activePCRBanks(inactiveXML(t, h, vm.spec.Name))
			fw := firmwareConfig(t, h, vm.spec.Name)
			sum := fileSum(t, nvram) // "" when the domain never started
			t.Logf("firmware configuration before protect:\n%s", fw)

			note := vm.protectNow(t, d)
			if wantNote := map[bool]string{true: "adopted", false: "new vTPM"}[tc.booted]; !strings.HasPrefix(note, wantNote) {
				t.Errorf("protect's note %q does not start %q", note, wantNote)
			}
			after := inactiveXML(t, h, vm.spec.Name)
			wantSame(t, "protect", fw, firmwareOf(after), sum, fileSum(t, nvram))
			if m := regexp.MustCompile(`<tpm model='([^']*)'>\s*<backend type='external'>`).FindStringSubmatch(after); m == nil || m[1] != tc.model {
				t.Errorf("after protect the domain's TPM is %v, want model %s on an external backend:\n%s", m, tc.model, after)
			}

			nv := "nv-uefi-libvirt"
			if !tc.booted {
				nv = "nv-uefi-nkp"
				recs := boot("first protected boot", guest.Config{Actions: []string{guest.ActionEK, guest.ActionNVWrite}, NV: nv})
				wantNV(t, "first protected boot", recs, nv)
				wantManufactured(t, "first protected boot", recs, cmp.Or(strings.Join(tc.banks, ","), "sha256"))
				ek = ekOf(recs)
			}
			// Stop and start: NV and EK as before, and status healthy while it runs.
			setJob(t, h, vm.spec.Name, guest.Config{Actions: []string{guest.ActionEK, guest.ActionNVRead, guest.ActionExtend, guest.ActionLoop}, Extend: "uefi-boot", Loop: 600})
			n := len(vm.f.console.records())
			virsh(t, h, "start", vm.spec.Name)
			recs := vm.f.console.waitFor(t, "a loop line", func(r []guest.Record) bool { return len(r) > n && hasKey(r[n:], "loop") })[n:]
			wantFirmwareMeasured(t, "protected boot", recs)
			wantNV(t, "protected boot", recs, nv)
			if got := ekOf(recs); got != ek || ek == "" {
				t.Errorf("the guest's EK is %q, want %q as before", got, ek)
			}
			wantStatusOK(t, d, vm.spec.Name)
			if tc.reset {
				// A reboot (Windows setup does several): QEMU stops and inits the vTPM
				// in the same process, no hook runs. The firmware measures again into
				// reset PCRs: PCR 0 as before, PCR 16 extended once again from zero.
				before := lastView(recs)
				n := len(vm.f.console.records())
				virsh(t, h, "reset", vm.spec.Name)
				recs := vm.f.console.waitFor(t, "a loop line after the reset", func(r []guest.Record) bool {
					return len(r) > n && hasKey(r[n:], "tpm-device") && hasKey(r[n:], "loop")
				})[n:]
				wantFirmwareMeasured(t, "boot after virsh reset", recs)
				wantNV(t, "boot after virsh reset", recs, nv)
				if got := lastView(recs); got != before {
					t.Errorf("after virsh reset the guest's TPM shows %+v, want %+v as in the boot before", got, before)
				}
				wantStatusOK(t, d, vm.spec.Name)
			}
			virsh(t, h, "destroy", vm.spec.Name)
			e2e.WaitFor(t, time.Minute, vm.spec.Name+" shut off", func() bool { return state(h, vm.spec.Name) == "shut off" })

			// Rekey (after a rotation, so that it rewrites the domain) and unprotect keep
			// the firmware configuration and the NVRAM.
			fw, sum = firmwareConfig(t, h, vm.spec.Name), fileSum(t, nvram)
			if sum == "" {
				t.Fatalf("no NVRAM file %s after two boots", nvram)
			}
			rotate(t, p, d)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			got, err := d.vms().Rekey(ctx, vm.spec.Name)
			cancel()
			if err != nil {
				t.Fatalf("rekey: %v", err)
			}
			if len(got.Objects) != 1 || got.Objects[0].KeyID == vm.prot.keyID {
				t.Errorf("rekey kept key %s: %+v", vm.prot.keyID, got)
			}
			wantSame(t, "rekey", fw, firmwareConfig(t, h, vm.spec.Name), sum, fileSum(t, nvram))
			ctx, cancel = context.WithTimeout(context.Background(), 2*time.Minute)
			_, err = d.vms().Unprotect(ctx, vm.spec.Name, vmapi.UnprotectRequest{TPM: tc.unprotect})
			cancel()
			if err != nil {
				t.Fatalf("unprotect: %v", err)
			}
			after = inactiveXML(t, h, vm.spec.Name)
			wantSame(t, "unprotect", fw, firmwareOf(after), sum, fileSum(t, nvram))
			if tc.unprotect == vmapi.UnprotectNone {
				if strings.Contains(after, "<tpm") {
					t.Errorf("after unprotect --tpm none the domain still has a TPM:\n%s", after)
				}
			} else {
				if !regexp.MustCompile(`<tpm model='` + tc.model + `'>\s*<backend type='emulator'`).MatchString(after) {
					t.Fatalf("after unprotect the domain has no libvirt-managed %s:\n%s", tc.model, after)
				}
				// Back on libvirt's swtpm with the vTPM's state: the same <active_pcr_banks>
				// in the definition as before protect, and the same EK, NV and PCR banks in
				// the guest.
				if got := activePCRBanks(after); got != pcrBanks || pcrBanks == "" && len(tc.banks) > 0 {
					t.Errorf("after unprotect --tpm keep the domain's <active_pcr_banks> is %q, want %q as before protect", got, pcrBanks)
				}
				recs := boot("boot after unprotect", guest.Config{Actions: []string{guest.ActionEK, guest.ActionNVRead}})
				wantNV(t, "boot after unprotect", recs, nv)
				if got := ekOf(recs); got != ek {
					t.Errorf("after unprotect the guest's EK is %q, want %q as before", got, ek)
				}
				if got, _ := guest.Last(recs, "pcr-banks"); tc.booted && got != banks {
					t.Errorf("after unprotect the guest sees PCR banks %q, want %q as before protect", got, banks)
				}
			}
			t.Logf("%s: %.0f s", tc.name, time.Since(start).Seconds())
		})
	}
}

// wantFirmwareMeasured checks that the guest kernel was started by UEFI firmware with
// Secure Boot on and that OVMF's measurements reached the vTPM: PCR 0 is not zero and
// equals PCR 0 replayed from the event log the firmware gave the kernel, and that log
// says the firmware measured SecureBoot=1 into PCR 7.
func wantFirmwareMeasured(t *testing.T, what string, recs []guest.Record) {
	t.Helper()
	if v, _ := guest.Last(recs, "efi"); v != "yes" {
		t.Errorf("%s: the guest says efi=%q, want yes (started by OVMF)", what, v)
	}
	if v, _ := guest.Last(recs, "eventlog-secureboot"); v != "1" {
		t.Errorf("%s: the event log says SecureBoot=%q, want 1", what, v)
	}
	pcr0, _ := guest.Last(recs, "pcr0")
	if len(pcr0) != 64 || pcr0 == strings.Repeat("0", 64) {
		t.Errorf("%s: PCR 0 %q, want the firmware's measurements", what, pcr0)
	}
	logPCR0, _ := guest.Last(recs, "eventlog-pcr0")
	if logPCR0 != pcr0 {
		size, _ := guest.Last(recs, "eventlog")
		problem, _ := guest.Last(recs, "eventlog-error")
		t.Errorf("%s: PCR 0 replayed from the event log (%s bytes; %s) is %q, the TPM's is %q", what, size, problem, logPCR0, pcr0)
	}
	banks, _ := guest.Last(recs, "pcr-banks")
	events, _ := guest.Last(recs, "eventlog-events")
	t.Logf("%s: PCR banks %s, %s events in the log, EK %s", what, banks, events, ekOf(recs))
}

// wantManufactured checks that a new vTPM looks to the guest like the one libvirt's
// swtpm_setup makes: only the PCR banks wanted (swtpm_setup.conf's sha256 unless the
// domain set <active_pcr_banks>), and an RSA EK certificate in NV.
func wantManufactured(t *testing.T, what string, recs []guest.Record, banks string) {
	t.Helper()
	if got, _ := guest.Last(recs, "pcr-banks"); got != banks {
		t.Errorf("%s: the guest sees PCR banks %q, want %q as libvirt's swtpm_setup activates", what, got, banks)
	}
	certs, _ := guest.Last(recs, "ek-certs")
	if !regexp.MustCompile(`^rsa:[1-9][0-9]{2,}(,|$)`).MatchString(certs) {
		t.Errorf("%s: the guest's EK certificates are %q, want an RSA EK certificate (rsa:SIZE) as swtpm_setup --create-ek-cert writes", what, certs)
	}
}

// wantStatusOK checks what `nkpctl vm status` says of the running VM: its TPM ok.
func wantStatusOK(t *testing.T, d *hostd, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if v, err := d.vms().Get(ctx, name); err != nil || !v.Running || v.TPM != "ok" || len(v.Problems) > 0 {
		t.Errorf("status of the running VM: %+v, %v; want running with TPM ok", v, err)
	}
}

// ekOf is what the guest printed about its EK: the key's hash and its certificates in NV
// (both PCR-independent state that adoption must keep).
func ekOf(recs []guest.Record) string {
	ek, _ := guest.Last(recs, "ek")
	certs, _ := guest.Last(recs, "ek-certs")
	if ek == "" {
		return ""
	}
	return ek + " certificates " + certs
}

// setJob changes the guest's job of a shut-off domain: its kernel command line in the
// defined XML, every other byte (nkp's metadata and TPM, the firmware) as it was.
func setJob(t *testing.T, h *libvirtns.Host, name string, cfg guest.Config) {
	t.Helper()
	args, err := cfg.KernelArgs()
	if err != nil {
		t.Fatal(err)
	}
	x := inactiveXML(t, h, name)
	re := regexp.MustCompile(`<cmdline>[^<]*</cmdline>`)
	if !re.MatchString(x) {
		t.Fatalf("%s has no <cmdline>:\n%s", name, x)
	}
	x = re.ReplaceAllLiteralString(x, "<cmdline>"+xmlEscape(args+noTimerCheck)+"</cmdline>")
	p := filepath.Join(t.TempDir(), name+".xml")
	if err := os.WriteFile(p, []byte(x), 0o600); err != nil {
		t.Fatal(err)
	}
	virsh(t, h, "define", p)
}

func inactiveXML(t *testing.T, h *libvirtns.Host, name string) string {
	t.Helper()
	return virsh(t, h, "dumpxml", "--inactive", "--security-info", name)
}

var activePCRBanksElem = regexp.MustCompile(`(?s)<active_pcr_banks>.*?</active_pcr_banks>|<active_pcr_banks/>`)

// activePCRBanks is the <active_pcr_banks> element of a domain XML with its white space
// removed ("" when there is none).
func activePCRBanks(x string) string {
	return strings.Join(strings.Fields(activePCRBanksElem.FindString(x)), "")
}

// firmwareConfig is the firmware part of the domain's defined XML (see firmwareOf).
func firmwareConfig(t *testing.T, h *libvirtns.Host, name string) string {
	t.Helper()
	fw := firmwareOf(inactiveXML(t, h, name))
	if !strings.Contains(fw, "<smm state='on'/>") || !strings.Contains(fw, "machine='pc-q35") {
		t.Fatalf("%s's firmware configuration lacks SMM or q35:\n%s", name, fw)
	}
	return fw
}

var firmwareParts = regexp.MustCompile(`(?s)<os[ >][^\n]*|<type arch[^\n]*|<loader[^>]*(?:/>|>[^<]*</loader>)|<nvram[^>]*(?:/>|>[^<]*</nvram>)|<firmware>.*?</firmware>|<smm[^>]*/>`)

// firmwareOf returns the <os> start tag, <type>, <loader>, <nvram>, <firmware> and
// <smm> elements of a domain XML exactly as written, one per line.
func firmwareOf(x string) string {
	return strings.Join(firmwareParts.FindAllString(x, -1), "\n")
}

// wantSame fails the test if op changed the firmware configuration or the NVRAM file.
func wantSame(t *testing.T, op, fw, fwAfter, sum, sumAfter string) {
	t.Helper()
	if fwAfter != fw {
		t.Errorf("%s changed the firmware configuration:\n%s\nwas:\n%s", op, fwAfter, fw)
	}
	if sumAfter != sum {
		t.Errorf("%s changed the NVRAM file: sha256 %s, was %s", op, sumAfter, sum)
	}
}

// fileSum is the SHA-256 of file p, "" when there is none.
func fileSum(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// rotate makes the provider rotate its KDK (and back it up, so that it releases the new
// version) and waits until d's primary is the new version.
func rotate(t *testing.T, p *provider, d *hostd) {
	t.Helper()
	_, old := d.status(t).primary(t)
	p.ctl(t, "rotate")
	p.backup(t)
	e2e.WaitFor(t, time.Minute, "hostd to see the new primary KDK", func() bool {
		for _, k := range d.status(t).KDKs {
			if k.Primary && k.Version > old {
				return true
			}
		}
		return false
	})
}
