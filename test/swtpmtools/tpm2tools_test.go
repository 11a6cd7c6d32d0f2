package swtpmtools

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

const nvIndex = "0x01500016"

// startupFlags makes the backend run and send TPM2_Startup(CLEAR) itself, as
// swtpm_setup starts it, so tpm2-tools need no CMD_INIT.
var startupFlags = []string{"--flags", "not-need-init,startup-clear"}

// TestTPM2Tools drives a backend with tpm2-tools through tpm2-tss' swtpm TCTI: random
// numbers, PCR extend and read, a primary key, and an NV index whose value survives a
// restart of the process.
func TestTPM2Tools(t *testing.T) {
	e2e.Require(t, "tpm2_getrandom", "tpm2_pcrextend", "tpm2_pcrread", "tpm2_createprimary",
		"tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
	forEachBackend(t, func(t *testing.T, be backend) {
		for _, tcp := range []bool{false, true} {
			t.Run(map[bool]string{false: "unix", true: "tcp"}[tcp], func(t *testing.T) { testTPM2Tools(t, be, tcp) })
		}
	})
}

func testTPM2Tools(t *testing.T, be backend, tcp bool) {
	state, work := t.TempDir(), t.TempDir()
	dir := sockDir(t)
	p := start(t, be, procOpts{stateDir: state, dir: dir, extra: startupFlags, tcp: tcp})
	tcti := p.TCTI()

	if got := strings.TrimSpace(mustRun(t, tcti, "tpm2_getrandom", "--hex", "32")); !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(got) {
		t.Errorf("tpm2_getrandom = %q, want 64 hex digits", got)
	}

	digest := sha256.Sum256([]byte("nkp event"))
	mustRun(t, tcti, "tpm2_pcrextend", "16:sha256="+hex.EncodeToString(digest[:]))
	want := sha256.Sum256(append(make([]byte, 32), digest[:]...))
	out := mustRun(t, tcti, "tpm2_pcrread", "sha256:16")
	if !strings.Contains(strings.ToLower(out), hex.EncodeToString(want[:])) {
		t.Errorf("tpm2_pcrread sha256:16 = %q, want 0x%X", out, want)
	}

	ctx := filepath.Join(work, "primary.ctx")
	out = mustRun(t, tcti, "tpm2_createprimary", "-C", "o", "-G", "ecc256", "-c", ctx)
	if !strings.Contains(out, "ecc") {
		t.Errorf("tpm2_createprimary printed %q, want an ECC key", out)
	}

	value := []byte("nkp NV value that must survive restarts")
	nvWrite(t, tcti, work, value)
	if got := nvRead(t, tcti, len(value)); !bytes.Equal(got, value) {
		t.Fatalf("tpm2_nvread = %q, want %q", got, value)
	}

	p.Stop()
	first := p
	p = start(t, be, procOpts{stateDir: state, dir: dir, extra: startupFlags, tcp: tcp})
	tcti = p.TCTI()
	if got := nvRead(t, tcti, len(value)); !bytes.Equal(got, value) {
		t.Fatalf("after a restart tpm2_nvread = %q, want %q", got, value)
	}
	// PCRs are volatile: Startup(CLEAR) after the restart resets PCR 16.
	out = mustRun(t, tcti, "tpm2_pcrread", "sha256:16")
	if !strings.Contains(out, "0x0000000000000000000000000000000000000000000000000000000000000000") {
		t.Errorf("PCR 16 after restart with Startup(CLEAR) = %q, want zeros", out)
	}
	p.Stop()
	for _, q := range []*tpmProc{first, p} {
		if ents, _ := os.ReadDir(q.Cwd); len(ents) != 0 {
			t.Errorf("%s wrote %d files into its working directory (%s...)", be.name, len(ents), ents[0].Name())
		}
	}
}

// nvWrite defines nvIndex (owner read/write, len(value) bytes) and writes value.
func nvWrite(t *testing.T, tcti []string, work string, value []byte) {
	t.Helper()
	mustRun(t, tcti, "tpm2_nvdefine", nvIndex, "-C", "o", "-s", strconv.Itoa(len(value)), "-a", "ownerread|ownerwrite")
	in := filepath.Join(work, "nv.in")
	if err := os.WriteFile(in, value, 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, tcti, "tpm2_nvwrite", nvIndex, "-C", "o", "-i", in)
}

func nvRead(t *testing.T, tcti []string, size int) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "nv.out")
	mustRun(t, tcti, "tpm2_nvread", nvIndex, "-C", "o", "-s", strconv.Itoa(size), "-o", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// stateFiles returns the contents of every regular file in dir.
func stateFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = b
	}
	return m
}

// TestEncryptedState writes a known NV value with tpm2_nvwrite into a state encrypted
// with --key and checks that no state file holds it, while plaintext state does (so the
// search can find it); then a wrong key is refused with the state files unchanged, and
// the right key still reads the value.
func TestEncryptedState(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
	rightKey, wrongKey := hexKeyFile(t), hexKeyFile(t)
	keyOpt := func(path string) []string { return []string{"--key", "file=" + path + ",mode=aes-256-cbc"} }
	secret := []byte("NKP-SECRET-" + strings.Repeat("x", 21))

	forEachBackend(t, func(t *testing.T, be backend) {
		for _, encrypted := range []bool{false, true} {
			name := map[bool]string{false: "plaintext", true: "encrypted"}[encrypted]
			t.Run(name, func(t *testing.T) {
				state, work, dir := t.TempDir(), t.TempDir(), sockDir(t)
				var key []string
				if encrypted {
					key = keyOpt(rightKey)
				}
				p := start(t, be, procOpts{stateDir: state, dir: dir, extra: append(key, startupFlags...)})
				tcti := []string{"TPM2TOOLS_TCTI=swtpm:path=" + p.Data}
				nvWrite(t, tcti, work, secret)
				p.Stop()

				before := stateFiles(t, state)
				found := false
				for name, b := range before {
					if bytes.Contains(b, secret) {
						found = true
						if encrypted {
							t.Errorf("state file %s holds the NV value in plaintext", name)
						}
					}
				}
				if !encrypted {
					if !found {
						t.Fatalf("the NV value is in no plaintext state file (%d files): the search cannot work", len(before))
					}
					return
				}

				// A wrong key: CMD_INIT fails, and the state files stay as they were.
				p = start(t, be, procOpts{stateDir: state, dir: dir, extra: keyOpt(wrongKey)})
				if out, err := runTool(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-i"); err == nil {
					t.Errorf("CMD_INIT with a wrong key succeeded: %s", out)
				}
				if be.name == "nkp-swtpm" && !strings.Contains(p.logText(), "wrong key") {
					t.Errorf("the log does not say the key is wrong: %q", p.logText())
				}
				p.Kill()
				after := stateFiles(t, state)
				for name, b := range before {
					if !bytes.Equal(after[name], b) {
						t.Errorf("state file %s changed after a start with a wrong key", name)
					}
				}

				// The right key still reads the value.
				p = start(t, be, procOpts{stateDir: state, dir: dir, extra: append(keyOpt(rightKey), startupFlags...)})
				if got := nvRead(t, tcti, len(secret)); !bytes.Equal(got, secret) {
					t.Errorf("after the wrong key, the right key reads %q, want %q", got, secret)
				}
			})
		}
	})
}

// TestSecondProcessRefused starts a second backend on a state directory a first one
// holds: the second must exit with an error and leave the first one serving.
func TestSecondProcessRefused(t *testing.T) {
	e2e.Require(t, "tpm2_getrandom")
	forEachBackend(t, func(t *testing.T, be backend) {
		state := t.TempDir()
		first := start(t, be, procOpts{stateDir: state, extra: startupFlags})
		second := startNoWait(t, be, procOpts{stateDir: state, extra: startupFlags})
		err := second.Wait(10 * time.Second)
		if err == nil {
			t.Fatalf("a second %s on the same state directory exited 0; log: %s", be.name, second.logText())
		}
		if log := second.logText(); !strings.Contains(strings.ToLower(log), "lock") {
			t.Errorf("the refusal does not mention the lock: %q", log)
		}
		mustRun(t, []string{"TPM2TOOLS_TCTI=swtpm:path=" + first.Data}, "tpm2_getrandom", "--hex", "8")
	})
}
