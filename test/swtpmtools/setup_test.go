package swtpmtools

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestSwtpmSetup runs swtpm_setup with the backend as its TPM (`--tpm "<prog> socket"`)
// the way libvirt does for a new vTPM, with the state encrypted by a passphrase given as
// a file or on an fd. Afterwards the backend, started on that state with the same
// passphrase, holds the EKs at 0x81010001 (RSA) and 0x81010016 (ECC) and the EK and
// platform certificates at NV 0x01c00002, 0x01c00016 and 0x01c08000, written and locked.
func TestSwtpmSetup(t *testing.T) {
	e2e.Require(t, "swtpm_setup", "swtpm_localca", "tpm2_nvreadpublic", "tpm2_getcap", "tpm2_nvread")
	e2e.RequireRoot(t) // swtpm_localca keeps its CA in /var/lib/swtpm-localca
	forEachBackend(t, func(t *testing.T, be backend) {
		for _, viaFD := range []bool{false, true} {
			name := map[bool]string{false: "pwdfile", true: "pwdfile-fd"}[viaFD]
			t.Run(name, func(t *testing.T) {
				argv := be.argv(t)
				prog, err := exec.LookPath(argv[0])
				if err != nil {
					t.Fatal(err)
				}
				prog, _ = filepath.Abs(prog)
				state, work := t.TempDir(), t.TempDir()
				pwd := filepath.Join(work, "pwd")
				if err := os.WriteFile(pwd, []byte("correct horse battery staple\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				args := []string{"--tpm2", "--tpm", prog + " socket", "--tpmstate", state,
					"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
					"--cipher", "aes-256-cbc", "--logfile", filepath.Join(work, "setup.log"), "--not-overwrite"}
				cmd := exec.Command("swtpm_setup", args...)
				if viaFD {
					f, err := os.Open(pwd)
					if err != nil {
						t.Fatal(err)
					}
					defer f.Close()
					cmd.ExtraFiles = []*os.File{f} // fd 3
					cmd.Args = append(cmd.Args, "--pwdfile-fd", "3")
				} else {
					cmd.Args = append(cmd.Args, "--pwdfile", pwd)
				}
				var out bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &out
				if err := cmd.Run(); err != nil {
					log, _ := os.ReadFile(filepath.Join(work, "setup.log"))
					t.Fatalf("swtpm_setup: %v\n%s\nsetup log:\n%s", err, out.String(), log)
				}

				p := start(t, be, procOpts{stateDir: state, extra: append([]string{"--key", "pwdfile=" + pwd + ",mode=aes-256-cbc"}, startupFlags...)})
				tcti := []string{"TPM2TOOLS_TCTI=swtpm:path=" + p.Data}
				nv := strings.ToLower(mustRun(t, tcti, "tpm2_nvreadpublic"))
				for _, idx := range []string{"0x1c00002", "0x1c00016", "0x1c08000"} {
					i := strings.Index(nv, idx+":")
					if i < 0 {
						t.Errorf("NV index %s missing; tpm2_nvreadpublic:\n%s", idx, nv)
						continue
					}
					entry := nv[i:]
					if j := strings.Index(entry[1:], "\n0x"); j >= 0 {
						entry = entry[:j+1]
					}
					for _, attr := range []string{"written", "writelocked", "platformcreate"} {
						if !strings.Contains(entry, attr) {
							t.Errorf("NV index %s lacks attribute %s:\n%s", idx, attr, entry)
						}
					}
				}
				handles := strings.ToLower(mustRun(t, tcti, "tpm2_getcap", "handles-persistent"))
				for _, h := range []string{"0x81010001", "0x81010016"} {
					if !strings.Contains(handles, h) {
						t.Errorf("persistent EK %s missing; tpm2_getcap handles-persistent:\n%s", h, handles)
					}
				}
				// The EK certificate is DER (a SEQUENCE, 0x30 0x82).
				certFile := filepath.Join(work, "ekcert.der")
				mustRun(t, tcti, "tpm2_nvread", "0x1c00002", "-C", "o", "-o", certFile)
				if der, err := os.ReadFile(certFile); err != nil || len(der) < 300 || der[0] != 0x30 {
					t.Errorf("EK certificate at 0x1c00002: %d bytes, %v; want a DER certificate", len(der), err)
				}
				if strings.Contains(mustRun(t, tcti, "tpm2_getcap", "pcrs"), "sha1: [ 0") {
					t.Errorf("the sha1 bank is active after setup; swtpm_setup.conf activates sha256 only")
				}
				p.Stop()

				// What libvirt runs at each start when the domain sets active_pcr_banks.
				reconf := []string{"--tpm2", "--tpm", prog + " socket", "--tpmstate", state,
					"--pwdfile", pwd, "--cipher", "aes-256-cbc", "--pcr-banks", "sha1,sha256", "--reconfigure",
					"--logfile", filepath.Join(work, "setup.log")}
				if out, err := runTool(t, nil, "swtpm_setup", reconf...); err != nil {
					log, _ := os.ReadFile(filepath.Join(work, "setup.log"))
					t.Fatalf("swtpm_setup --reconfigure: %v\n%s\n%s", err, out, log)
				}
				p = start(t, be, procOpts{stateDir: state, extra: append([]string{"--key", "pwdfile=" + pwd + ",mode=aes-256-cbc"}, startupFlags...)})
				if pcrs := mustRun(t, p.TCTI(), "tpm2_getcap", "pcrs"); !strings.Contains(pcrs, "sha1: [ 0") || !strings.Contains(pcrs, "sha256: [ 0") {
					t.Errorf("after --reconfigure --pcr-banks sha1,sha256: tpm2_getcap pcrs =\n%s", pcrs)
				}
			})
		}
	})
}
