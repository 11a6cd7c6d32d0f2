package swtpmtools

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestOptions checks that options which change behaviour do so, on both backends.
func TestOptions(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "tpm2_pcrextend", "tpm2_pcrread", "tpm2_shutdown")
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
	tests := []struct {
		name  string
		extra []string
		check func(t *testing.T, be backend, p *tpmProc)
	}{
		{"--server disconnect closes after each response", []string{"--server", "type=unixio,disconnect,path=DATA"}, func(t *testing.T, be backend, p *tpmProc) {
			c, err := netDial(p.Data)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write(getRandom); err != nil {
				t.Fatal(err)
			}
			rsp := make([]byte, 20)
			if _, err := io.ReadFull(c, rsp); err != nil {
				t.Fatalf("GetRandom response: %v", err)
			}
			if n, err := c.Read(make([]byte, 1)); err != io.EOF {
				t.Errorf("after the response: read %d bytes, %v; want EOF", n, err)
			}
		}},
		{"--tpmstate mode sets the state files' mode", []string{"--tpmstate", "dir=STATE,mode=0600"}, func(t *testing.T, be backend, p *tpmProc) {
			defineIndex(t, p)
			fi, err := os.Stat(filepath.Join(p.StateDir, "tpm2-00.permall"))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("permall mode %v, want 0600", fi.Mode().Perm())
			}
		}},
		{"--locality reject-locality-4", []string{"--locality", "reject-locality-4"}, func(t *testing.T, be backend, p *tpmProc) {
			if out, err := runTool(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-l", "4"); err == nil {
				t.Errorf("SET_LOCALITY 4 accepted: %s", out)
			}
			mustRun(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-l", "3")
		}},
		{"--seccomp action=none is accepted", []string{"--seccomp", "action=none"}, func(t *testing.T, be backend, p *tpmProc) {
			mustRun(t, p.TCTI(), "tpm2_getrandom", "--hex", "8")
		}},
		{"--flags startup-state resumes after TPM2_Shutdown(STATE)", nil, func(t *testing.T, be backend, p *tpmProc) {
			digest := sha256.Sum256([]byte("kept across an orderly restart"))
			mustRun(t, p.TCTI(), "tpm2_pcrextend", "10:sha256="+hex.EncodeToString(digest[:]))
			want := sha256.Sum256(append(make([]byte, 32), digest[:]...))
			mustRun(t, p.TCTI(), "tpm2_shutdown") // SU_STATE unless -c
			p.Stop()
			q := start(t, be, procOpts{stateDir: p.StateDir, extra: []string{"--flags", "not-need-init,startup-state"}})
			// PCR 10 is saved by Shutdown(STATE) (16 and 23 are not).
			if out := mustRun(t, q.TCTI(), "tpm2_pcrread", "sha256:10"); !strings.Contains(strings.ToLower(out), hex.EncodeToString(want[:])) {
				t.Errorf("PCR 10 after Startup(STATE) = %q, want 0x%X", out, want)
			}
		}},
	}
	forEachBackend(t, func(t *testing.T, be backend) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				dir, state := sockDir(t), t.TempDir()
				extra := append([]string{}, startupFlags...)
				for _, a := range tt.extra {
					a = strings.ReplaceAll(a, "DATA", filepath.Join(dir, "tpm.sock"))
					extra = append(extra, strings.ReplaceAll(a, "STATE", state))
				}
				// The last --server/--tpmstate wins, in swtpm as in nkp-swtpm.
				p := start(t, be, procOpts{stateDir: state, dir: dir, extra: extra})
				tt.check(t, be, p)
			})
		}
	})
}

// TestStartupDeactivatedRefused: startup-deactivated exists for TPM 1.2 only; nkp-swtpm
// says so instead of starting a TPM 2 in a state nobody asked for.
func TestStartupDeactivatedRefused(t *testing.T) {
	code, _, stderr := runBackend(t, backends[1], nil, "--tpm2", "--ctrl", "type=unixio,path="+filepath.Join(sockDir(t), "c"),
		"--tpmstate", "dir="+t.TempDir(), "--flags", "startup-deactivated")
	if code == 0 || !strings.Contains(stderr, "TPM 1.2") {
		t.Errorf("startup-deactivated: exit %d, stderr %q; want a refusal naming TPM 1.2", code, stderr)
	}
}

// TestKeyForms writes state with swtpm under each form of --key, and reads it with
// nkp-swtpm under the same option: nkp derives the same key from a hex or binary key
// file, a key or passphrase on an fd, and a passphrase file through PBKDF2 or SHA-512,
// so an encrypted swtpm VM moves over with its option unchanged. remove deletes the file.
func TestKeyForms(t *testing.T) {
	e2e.Require(t, "swtpm", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
	raw := make([]byte, 32)
	rand.Read(raw)
	files := map[string][]byte{
		"hex":        []byte(hex.EncodeToString(raw) + "\n"),
		"binary":     raw,
		"passphrase": []byte("correct horse battery staple\n"),
	}
	tests := []struct {
		name   string
		file   string // which content
		option string // KEY is replaced by the file path or fd
		viaFD  bool
		remove bool
	}{
		{"hex key file", "hex", "file=KEY,mode=aes-256-cbc", false, false},
		{"binary key file", "binary", "file=KEY,format=binary,mode=aes-256-cbc", false, false},
		{"hex key on an fd", "hex", "fd=KEY,mode=aes-256-cbc", true, false},
		{"passphrase pbkdf2", "passphrase", "pwdfile=KEY,mode=aes-256-cbc", false, false},
		{"passphrase sha512", "passphrase", "pwdfile=KEY,kdf=sha512", false, false},
		{"passphrase on an fd", "passphrase", "pwdfd=KEY,mode=aes-256-cbc", true, false},
		{"key file removed", "hex", "file=KEY,mode=aes-256-cbc,remove", false, true},
	}
	value := []byte("sealed under every form of key")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state, work := t.TempDir(), t.TempDir()
			option := func() ([]string, []*os.File) {
				if tt.viaFD {
					r, w, err := os.Pipe()
					if err != nil {
						t.Fatal(err)
					}
					w.Write(files[tt.file])
					w.Close()
					t.Cleanup(func() { r.Close() })
					return []string{"--key", strings.ReplaceAll(tt.option, "KEY", "3")}, []*os.File{r}
				}
				path := filepath.Join(work, "key-"+tt.file)
				if err := os.WriteFile(path, files[tt.file], 0o600); err != nil {
					t.Fatal(err)
				}
				return []string{"--key", strings.ReplaceAll(tt.option, "KEY", path)}, nil
			}
			key, fds := option()
			p := start(t, backends[0], procOpts{stateDir: state, extra: append(key, startupFlags...), files: fds})
			nvWrite(t, p.TCTI(), work, value)
			p.Stop()
			if state := stateFiles(t, state); bytes.Contains(state["tpm2-00.permall"], value) {
				t.Fatalf("swtpm wrote the value in plaintext: the key option was not applied")
			}

			key, fds = option()
			p = start(t, backends[1], procOpts{stateDir: state, extra: append(key, startupFlags...), files: fds})
			if got := nvRead(t, p.TCTI(), len(value)); !bytes.Equal(got, value) {
				t.Errorf("nkp-swtpm reads %q, want %q", got, value)
			}
			if tt.remove {
				if _, err := os.Stat(filepath.Join(work, "key-"+tt.file)); !os.IsNotExist(err) {
					t.Errorf("key file still there with remove: %v", err)
				}
			}
		})
	}
}

// TestStateBackup: with --tpmstate ...,backup the previous permall is kept as .bak, and
// a damaged permall falls back to it instead of leaving the VM without its TPM.
func TestStateBackup(t *testing.T) {
	forEachBackend(t, func(t *testing.T, be backend) {
		if !hasFeature(t, be, "tpmstate-dir-backend-opt-backup") {
			t.Skipf("%s does not report tpmstate-dir-backend-opt-backup (newer swtpm releases have it)", be.name)
		}
		state, dir := t.TempDir(), sockDir(t)
		extra := append([]string{"--tpmstate", "dir=" + state + ",backup"}, startupFlags...)
		p := start(t, be, procOpts{stateDir: state, dir: dir, extra: extra})
		defineIndex(t, p) // the index is in permall, and after one more write in .bak too
		conn, err := netDial(p.Data)
		if err != nil {
			t.Fatal(err)
		}
		tpm := &connTPM{c: conn}
		h, err := nvHandle(tpm)
		if err == nil {
			err = nvWriteU64(tpm, h, 42)
		}
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
		p.Stop()
		perm := filepath.Join(state, "tpm2-00.permall")
		if _, err := os.Stat(perm + ".bak"); err != nil {
			t.Fatalf("no backup next to permall: %v", err)
		}
		if err := os.WriteFile(perm, []byte("damaged"), 0o600); err != nil {
			t.Fatal(err)
		}
		p = start(t, be, procOpts{stateDir: state, dir: dir, extra: extra})
		conn, err = netDial(p.Data)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := nvHandle(&connTPM{c: conn}); err != nil {
			t.Errorf("after falling back to the backup the NV index is gone: %v", err)
		}
	})
}
