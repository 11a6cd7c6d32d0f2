package cli

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/seccomp"
	"github.com/nkp-dev/nkp/test/e2e"
)

func TestMain(m *testing.M) { e2e.Main(m) }

func TestSeccompAction(t *testing.T) {
	tests := []struct {
		opt     string
		want    seccomp.Action
		wantErr bool
	}{
		{"", seccomp.Kill, false}, // no --seccomp: swtpm's default
		{"kill", seccomp.Kill, false},
		{"log", seccomp.Log, false},
		{"none", seccomp.None, false},
		{"trap", 0, true},
	}
	for _, tt := range tests {
		got, err := seccompAction(tt.opt)
		if (err != nil) != tt.wantErr || (err == nil && got != tt.want) {
			t.Errorf("seccompAction(%q) = %v, %v; want %v, error %v", tt.opt, got, err, tt.want, tt.wantErr)
		}
		if err != nil && !strings.Contains(err.Error(), "--seccomp") {
			t.Errorf("seccompAction(%q) error %q does not name --seccomp", tt.opt, err)
		}
	}
}

// TestSeccompInstalled runs nkp-swtpm and reads its /proc/PID/status once it has
// answered a control command (the filter goes in before the first client byte is
// read): a filter (Seccomp: 2) and no_new_privs by default and with log or kill, none
// with --seccomp action=none. The vTPM then still stops cleanly on SIGTERM.
func TestSeccompInstalled(t *testing.T) {
	if _, err := os.Stat("/proc/sys/kernel/seccomp/actions_avail"); err != nil {
		e2e.Unavailable(t, "this kernel has no seccomp filters (/proc/sys/kernel/seccomp/actions_avail missing)")
	}
	bin := e2e.BuildBinary(t, "./cmd/nkp-swtpm")
	tests := []struct {
		name        string
		args        []string
		daemon      bool
		wantSeccomp string
		wantNNP     string
	}{
		{"default", nil, false, "2", "1"},
		{"kill", []string{"--seccomp", "action=kill"}, false, "2", "1"},
		{"log", []string{"--seccomp", "action=log"}, false, "2", "1"},
		{"none", []string{"--seccomp", "action=none"}, false, "0", "0"},
		{"daemon default", nil, true, "2", "1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			sock, pidPath := filepath.Join(dir, "ctrl"), filepath.Join(dir, "pid")
			args := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir,
				"--ctrl", "type=unixio,path=" + sock, "--pid", "file=" + pidPath,
				"--log", "file=" + filepath.Join(dir, "log")}, tt.args...)
			if tt.daemon {
				args = append(args, "-d")
			}
			cmd := exec.Command(bin, args...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			var pid int
			var waitErr error
			done := make(chan struct{}) // closed when the foreground process has exited
			if tt.daemon {
				// -d returns once the daemon is ready: the filter must be in by then.
				if err := cmd.Run(); err != nil {
					t.Fatalf("nkp-swtpm -d: %v\n%s", err, stderr.String())
				}
				pid = readPid(t, pidPath)
				t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
				if got := statusField(t, pid, "Seccomp"); got != tt.wantSeccomp {
					t.Errorf("daemon ready with Seccomp %q, want %s", got, tt.wantSeccomp)
				}
			} else {
				if err := cmd.Start(); err != nil {
					t.Fatalf("start nkp-swtpm: %v", err)
				}
				pid = cmd.Process.Pid
				go func() { waitErr = cmd.Wait(); close(done) }()
				t.Cleanup(func() {
					cmd.Process.Kill()
					<-done
				})
			}
			// GET_CAPABILITY answered: the filter is in. Then CMD_INIT manufactures the
			// TPM and writes its state (temp file, fsync, rename, fsync dir) under it.
			c := dialCtrl(t, sock)
			ctrlCommand(t, c, ctrl.GetCapability{}, 8)
			if got := statusField(t, pid, "Seccomp"); got != tt.wantSeccomp {
				t.Errorf("/proc/%d/status Seccomp %q, want %s", pid, got, tt.wantSeccomp)
			}
			if got := statusField(t, pid, "NoNewPrivs"); got != tt.wantNNP {
				t.Errorf("/proc/%d/status NoNewPrivs %q, want %s", pid, got, tt.wantNNP)
			}
			tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/status")
			for _, p := range tasks {
				b, err := os.ReadFile(p)
				if err == nil && !strings.Contains(string(b), "\nSeccomp:\t"+tt.wantSeccomp+"\n") {
					t.Errorf("thread %s has not Seccomp: %s", p, tt.wantSeccomp)
				}
			}

			if _, err := os.Stat(filepath.Join(dir, "tpm2-00.permall")); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("state written before CMD_INIT (%v); the test would not show a write under the filter", err)
			}
			ctrlCommand(t, c, ctrl.Init{}, 4)

			// Graceful shutdown under the filter: TPM2_Shutdown, state saved,
			// pid file and socket removed.
			if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
				t.Fatalf("SIGTERM: %v", err)
			}
			if tt.daemon {
				// The daemon's parent is PID 1, which may never reap it.
				e2e.WaitFor(t, 10*time.Second, "the daemon to exit", func() bool { return exited(pid) })
			} else {
				select {
				case <-done:
					if waitErr != nil {
						t.Fatalf("nkp-swtpm after SIGTERM: %v (want exit 0)\n%s", waitErr, stderr.String())
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("nkp-swtpm did not exit within 10 s of SIGTERM")
				}
			}
			for _, p := range []string{pidPath, sock} {
				if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there after a clean stop (%v)", p, err)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "tpm2-00.permall")); err != nil {
				t.Errorf("no saved state after the clean stop: %v", err)
			}
		})
	}
}

// dialCtrl connects to the control socket, waiting for it (bounded).
func dialCtrl(t *testing.T, sock string) net.Conn {
	t.Helper()
	var c net.Conn
	e2e.WaitFor(t, 10*time.Second, "the control socket "+sock, func() bool {
		var err error
		c, err = net.Dial("unix", sock)
		return err == nil
	})
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return c
}

// ctrlCommand sends req on c and checks that the response of n bytes has result 0.
func ctrlCommand(t *testing.T, c net.Conn, req ctrl.Request, n int) {
	t.Helper()
	if _, err := c.Write(req.Marshal()); err != nil {
		t.Fatalf("%v: %v", req.Code(), err)
	}
	rsp := make([]byte, n)
	if _, err := io.ReadFull(c, rsp); err != nil {
		t.Fatalf("%v response: %v", req.Code(), err)
	}
	if res := binary.BigEndian.Uint32(rsp); res != 0 {
		t.Fatalf("%v result %#x, want 0", req.Code(), res)
	}
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pid file %q: %v", b, err)
	}
	return pid
}

// statusField returns a field of /proc/PID/status.
func statusField(t *testing.T, pid int, key string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatalf("status of %d: %v", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && k == key {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("/proc/%d/status has no %s line", pid, key)
	return ""
}

// exited reports whether pid is gone or a zombie.
func exited(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	// "PID (comm) S ...": the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'Z'
}
