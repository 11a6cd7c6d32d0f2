package vm

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

// TestSetupArgs: swtpm_setup gets libvirt's arguments (libvirt 9.0's
// qemuTPMEmulatorRunSetup), nkp-swtpm as its TPM and the key on an fd.
func TestSetupArgs(t *testing.T) {
	libvirts := []string{"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}
	base := func(prog string) []string {
		return append(append([]string{prog, "--tpm2", "--tpm", "/usr/bin/nkp-swtpm socket", "--tpmstate", "/s/.setup-1",
			"--vmid", "web 1:3f1c0a3e-8a5f-4e3b-9a51-6b0f5d1e2c01", "--logfile", "/s/.setup-1/setup.log"}, libvirts...),
			"--keyfile-fd", "3", "--cipher", "aes-256-cbc")
	}
	p := setupParams{VTPM: "/usr/bin/nkp-swtpm", StateDir: "/s/.setup-1", LogFile: "/s/.setup-1/setup.log",
		VMName: "web 1", VMUUID: "3f1c0a3e-8a5f-4e3b-9a51-6b0f5d1e2c01", KeyFD: 3}
	with := func(f func(*setupParams)) setupParams { q := p; f(&q); return q }
	tests := []struct {
		name string
		p    setupParams
		want []string
	}{
		{"defaults: swtpm_setup's banks and config", p, base("swtpm_setup")},
		{"empty active_pcr_banks is the default", with(func(q *setupParams) { q.Banks = []string{} }), base("swtpm_setup")},
		{"one bank", with(func(q *setupParams) { q.Banks = []string{"sha384"} }), append(base("swtpm_setup"), "--pcr-banks", "sha384")},
		{"banks in the domain's order", with(func(q *setupParams) { q.Banks = []string{"sha256", "sha1"} }), append(base("swtpm_setup"), "--pcr-banks", "sha256,sha1")},
		{"program and config", with(func(q *setupParams) { q.Program = "/opt/swtpm_setup"; q.Config = "/etc/nkp/swtpm_setup.conf" }),
			append(base("/opt/swtpm_setup"), "--config", "/etc/nkp/swtpm_setup.conf")},
		{"other fd", with(func(q *setupParams) { q.KeyFD = 5 }), func() []string {
			a := base("swtpm_setup")
			a[len(a)-3] = "5"
			return a
		}()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := setupArgs(tt.p)
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("setupArgs =\n%q\nwant\n%q", got, tt.want)
			}
			for _, a := range got {
				if strings.Contains(a, "pwd") || strings.Contains(a, "key=") {
					t.Fatalf("argument %q could carry a secret", a)
				}
			}
		})
	}
}

// TestManufactureFails: without swtpm_setup, or when it fails, protect of a VM without
// vTPM state fails naming the VM, the tool and the way out, and changes nothing: same
// XML, no state directory, no journal, no catalog entry. The fake swtpm_setup also
// shows that the key arrives on fd 3 (64 hex digits) and is in no argument.
func TestManufactureFails(t *testing.T) {
	dir := t.TempDir()
	failing := filepath.Join(dir, "swtpm_setup")
	script := `#!/bin/sh
key=$(cat <&3)
log=
while [ $# -gt 0 ]; do case "$1" in --logfile) log=$2; shift;; esac; shift; done
echo "key on fd 3: ${#key} characters" >>"$log"
echo "swtpm_localca: could not write /var/lib/swtpm-localca/certserial" >>"$log"
exit 1
`
	if err := os.WriteFile(failing, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, prog string
		want       []string
	}{
		{"missing", filepath.Join(dir, "nope", "swtpm_setup"), []string{"is not installed", "apt-get install swtpm-tools"}},
		{"failing", failing, []string{"exit status 1", "key on fd 3: 64 characters", "certserial", "swtpm-tools"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.m.cfg.Setup = &SwtpmSetup{Program: tt.prog, VTPM: "/usr/bin/nkp-swtpm"}
			tpm := "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><active_pcr_banks><sha256/><sha384/></active_pcr_banks></backend></tpm>"
			e.define(t, "mf1", uuid1, tpm)
			before := string(domainXML("mf1", uuid1, tpm))
			_, err := e.m.Protect(context.Background(), "mf1")
			if err == nil {
				t.Fatal("protect succeeded")
			}
			for _, w := range append([]string{`vm "mf1"`, tt.prog, "nothing was changed"}, tt.want...) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if !errors.Is(err, ErrUnavailable) {
				t.Errorf("error %v is not ErrUnavailable", err)
			}
			e.lv.mu.Lock()
			after := string(e.lv.doms[uuid1])
			e.lv.mu.Unlock()
			if after != before {
				t.Errorf("domain changed:\n%s", after)
			}
			if ents, _ := os.ReadDir(filepath.Join(e.m.cfg.VTPMDir, uuid1)); len(ents) != 0 {
				t.Errorf("left in the vTPM directory: %v", ents)
			}
			if _, err := os.Stat(e.m.j.path(uuid1)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("journal left: %v", err)
			}
			if _, ok := e.cat.get(uuid1, domxml.ObjectVTPM); ok {
				t.Errorf("catalog entry left")
			}
		})
	}
}

// TestPCRBanksKept: protect keeps the emulator's <active_pcr_banks> in nkp's metadata
// (the external backend has no place for it), and unprotect --tpm keep gives it back.
func TestPCRBanksKept(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "pb1", uuid1, "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><active_pcr_banks><sha256/><sha384/></active_pcr_banks></backend></tpm>")
	if _, err := e.m.Protect(ctx, "pb1"); err != nil {
		t.Fatal(err)
	}
	d := e.lv.domain(t, uuid1)
	if o, _ := d.Metadata.Object(domxml.ObjectVTPM); o.PCRBanks != "sha256,sha384" {
		t.Fatalf("vtpm object %+v, want pcr-banks sha256,sha384", o)
	}
	if _, err := e.m.Rekey(ctx, "pb1"); err != nil {
		t.Fatal(err)
	}
	if o, _ := e.lv.domain(t, uuid1).Metadata.Object(domxml.ObjectVTPM); o.PCRBanks != "sha256,sha384" {
		t.Fatalf("after rekey: vtpm object %+v, want pcr-banks sha256,sha384", o)
	}
	if _, err := e.m.Unprotect(ctx, "pb1", vmapi.UnprotectKeep); err != nil {
		t.Fatal(err)
	}
	tp, _ := e.lv.domain(t, uuid1).TPM()
	if tp == nil || tp.Backend != domxml.BackendEmulator || !reflect.DeepEqual(tp.ActivePCRBanks, []string{"sha256", "sha384"}) {
		t.Fatalf("TPM after unprotect = %+v, want the emulator with banks sha256, sha384", tp)
	}
}
