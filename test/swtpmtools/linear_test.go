package swtpmtools

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestLinearFileAcrossBackends: a linear state file (--tpmstate backend-uri=file://)
// moves between Debian's swtpm and nkp-swtpm both ways, plaintext, with a key file and
// with a passphrase: the NV index one backend's TPM defined and wrote reads back in the
// other's, which then writes it again, and the first reads that back.
func TestLinearFileAcrossBackends(t *testing.T) {
	requireFeature(t, "nvram-backend-file")
	keyFile, pwdFile := hexKeyFile(t), passphraseFile(t)
	swtpmBE, nkp := backends[0], backends[1]
	for _, key := range []struct {
		name string
		opt  []string
	}{
		{"plaintext", nil},
		{"key file", []string{"--key", "file=" + keyFile + ",mode=aes-256-cbc"}},
		{"passphrase", []string{"--key", "pwdfile=" + pwdFile + ",mode=aes-256-cbc"}},
	} {
		for _, dir := range []struct {
			name          string
			first, second backend
		}{{"swtpm to nkp", swtpmBE, nkp}, {"nkp to swtpm", nkp, swtpmBE}} {
			t.Run(key.name+"/"+dir.name, func(t *testing.T) {
				work := t.TempDir()
				img := filepath.Join(t.TempDir(), "tpm.img")
				opts := procOpts{stateFile: img, extra: append(append([]string{}, key.opt...), startupFlags...)}
				value := []byte(fmt.Sprintf("%-24s", "written by "+dir.first.name))
				p := start(t, dir.first, opts)
				nvWrite(t, p.TCTI(), work, value)
				p.Stop()

				p = start(t, dir.second, opts)
				if got := nvRead(t, p.TCTI(), len(value)); !bytes.Equal(got, value) {
					t.Fatalf("%s reads %q from %s's linear file, want %q\nlog: %s", dir.second.name, got, dir.first.name, value, p.logText())
				}
				again := []byte(fmt.Sprintf("%-24s", "then by "+dir.second.name))
				in := filepath.Join(work, "again")
				os.WriteFile(in, again, 0o600)
				mustRun(t, p.TCTI(), "tpm2_nvwrite", nvIndex, "-C", "o", "-i", in)
				p.Stop()

				p = start(t, dir.first, opts)
				if got := nvRead(t, p.TCTI(), len(value)); !bytes.Equal(got, again) {
					t.Fatalf("%s reads %q back, want %q", dir.first.name, got, again)
				}
				p.Stop()
				if key.opt != nil {
					b, _ := os.ReadFile(img)
					if bytes.Contains(b, value) || bytes.Contains(b, again) {
						t.Error("the NV value is in the encrypted linear file in the clear")
					}
				}
			})
		}
	}
}

// TestLinearFileLocked: while nkp-swtpm runs on a linear file, a second nkp-swtpm and a
// swtpm with the lock option (swtpm ≥ 0.8; 0.7.1 never locks a linear file) are refused
// (the sentence says the file is in use), and the first one keeps serving; a linear file
// open to others is refused.
func TestLinearFileLocked(t *testing.T) {
	requireFeature(t, "nvram-backend-file")
	swtpmBE, nkp := backends[0], backends[1]
	img := filepath.Join(t.TempDir(), "tpm.img")
	first := start(t, nkp, procOpts{stateFile: img, extra: startupFlags})
	defineIndex(t, first)

	second := startNoWait(t, nkp, procOpts{stateFile: img, extra: startupFlags})
	if err := second.Wait(10 * time.Second); err == nil {
		t.Fatalf("a second nkp-swtpm on the same linear file exited 0; log: %s", second.logText())
	}
	if log := second.logText() + second.stderr.String(); !strings.Contains(log, "in use") {
		t.Errorf("the second nkp-swtpm's refusal does not say the file is in use: %q", log)
	}
	if hasFeature(t, swtpmBE, "tpmstate-opt-lock") {
		// The second --tpmstate (swtpm takes the last) adds lock, without which swtpm
		// does not lock a linear file.
		sw := startNoWait(t, swtpmBE, procOpts{stateFile: img, extra: append([]string{"--tpmstate", "backend-uri=file://" + img + ",lock"}, startupFlags...)})
		if err := sw.Wait(10 * time.Second); err == nil || !strings.Contains(sw.logText()+sw.stderr.String(), "Could not lock") {
			t.Errorf("swtpm with lock on the linear file nkp-swtpm holds: %v; log: %s", err, sw.logText()+sw.stderr.String())
		}
	} else {
		t.Log("this swtpm has no tpmstate lock option: it never locks a linear file, so nkp-swtpm cannot keep it out")
	}
	mustRun(t, []string{"TPM2TOOLS_TCTI=swtpm:path=" + first.Data}, "tpm2_getrandom", "--hex", "8")
	first.Stop()

	os.Chmod(img, 0o644)
	open := startNoWait(t, nkp, procOpts{stateFile: img, extra: startupFlags})
	if err := open.Wait(10 * time.Second); err == nil || !strings.Contains(open.logText()+open.stderr.String(), "open to other users") {
		t.Errorf("nkp-swtpm on a linear file readable by others: %v; log: %s", err, open.logText()+open.stderr.String())
	}
}

// requireFeature skips t unless both backends advertise feature and the tools the
// linear tests use are installed.
func requireFeature(t *testing.T, feature string) {
	t.Helper()
	e2e.Require(t, "swtpm", "swtpm_ioctl", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread", "tpm2_getrandom")
	for _, be := range backends {
		if !hasFeature(t, be, feature) {
			t.Skipf("%s lacks %s", be.name, feature)
		}
	}
}
