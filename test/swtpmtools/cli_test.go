package swtpmtools

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

// runBackend runs a backend's program with args to its end (bounded) and returns the
// exit code and the output streams.
func runBackend(t *testing.T, be backend, files []*os.File, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	argv := be.argv(t)
	cmd := exec.Command(argv[0], append(argv[1:], args...)...)
	cmd.ExtraFiles = files
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s %v did not return within 30 s", be.name, args)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// alive reports whether pid runs and is not a zombie (PID 1 here does not reap).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z'
}

// keyPipe returns the read end of a pipe holding a random 256-bit hex key, the way a
// supervisor hands nkp-swtpm its key (never in argv or the environment).
func keyPipe(t *testing.T) *os.File {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	k := make([]byte, 32)
	rand.Read(k)
	if _, err := w.WriteString(hex.EncodeToString(k)); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() { r.Close() })
	return r
}

// defineIndex defines an NV index through the data socket, which makes the TPM write
// its permanent state.
func defineIndex(t *testing.T, p *tpmProc) {
	t.Helper()
	conn, err := netDial(p.Data)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := nvDefine(&connTPM{c: conn}); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
}

// TestDaemon starts a backend with -d, the state key on an inherited fd and a pid file:
// the command returns 0, the daemon serves an encrypted TPM and ends on CMD_SHUTDOWN.
// nkp-swtpm returns only once the daemon serves, so its sockets answer at once.
func TestDaemon(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "tpm2_getrandom")
	forEachBackend(t, func(t *testing.T, be backend) {
		state, dir := t.TempDir(), sockDir(t)
		ctrl, data, pidf := filepath.Join(dir, "tpm.sock.ctrl"), filepath.Join(dir, "tpm.sock"), filepath.Join(dir, "pid")
		code, _, stderr := runBackend(t, be, []*os.File{keyPipe(t)}, "-d", "--tpm2",
			"--ctrl", "type=unixio,path="+ctrl, "--server", "type=unixio,path="+data,
			"--tpmstate", "dir="+state, "--key", "fd=3,mode=aes-256-cbc", "--pid", "file="+pidf,
			"--flags", "not-need-init,startup-clear", "--log", "file="+filepath.Join(dir, "log"))
		if code != 0 {
			t.Fatalf("%s -d exited %d: %s", be.name, code, stderr)
		}
		if be.name == "nkp-swtpm" && !(dialable(ctrl) && dialable(data)) {
			t.Errorf("nkp-swtpm -d returned before its sockets accept connections")
		}
		var pid int
		e2e.WaitFor(t, 10*time.Second, "the pid file", func() bool {
			b, _ := os.ReadFile(pidf)
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
			return pid > 0 && dialable(ctrl) && dialable(data)
		})
		t.Cleanup(func() {
			if alive(pid) {
				if p, err := os.FindProcess(pid); err == nil {
					p.Kill()
				}
			}
		})
		if !alive(pid) {
			t.Fatalf("pid %d from the pid file does not run", pid)
		}
		mustRun(t, []string{"TPM2TOOLS_TCTI=swtpm:path=" + data}, "tpm2_getrandom", "--hex", "8")
		// GET_CONFIG bit 0: the state is encrypted with a key.
		if out := mustRun(t, nil, "swtpm_ioctl", "--unix", ctrl, "-g"); !strings.Contains(out, "0x1") {
			t.Errorf("swtpm_ioctl -g = %q, want flags 0x1 (state key in use)", out)
		}
		mustRun(t, nil, "swtpm_ioctl", "--unix", ctrl, "-s")
		e2e.WaitFor(t, 10*time.Second, "the daemon to exit after CMD_SHUTDOWN", func() bool { return !alive(pid) })
	})
}

// TestDaemonStartError: when the daemon cannot start, nkp-swtpm -d exits non-zero and
// says why: a missing state directory, or a wrong key for the state when the TPM starts
// at launch. (swtpm 0.7.1 forks before it checks, so it is not held to this.)
func TestDaemonStartError(t *testing.T) {
	be := backends[1]
	encrypted := t.TempDir()
	p := start(t, be, procOpts{stateDir: encrypted, extra: append([]string{"--key", "file=" + hexKeyFile(t)}, startupFlags...)})
	defineIndex(t, p)
	p.Stop()
	before := stateFiles(t, encrypted)

	tests := []struct {
		name, state string
		extra       []string
		want        []string
	}{
		{"missing state directory", filepath.Join(t.TempDir(), "no-such-dir"), nil, []string{"no-such-dir", "does not exist"}},
		{"wrong key", encrypted, []string{"--key", "file=" + hexKeyFile(t)}, []string{"permall", "wrong key"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := sockDir(t)
			args := append([]string{"-d", "--tpm2", "--ctrl", "type=unixio,path=" + filepath.Join(dir, "c"),
				"--tpmstate", "dir=" + tt.state, "--flags", "not-need-init,startup-clear", "--pid", "file=" + filepath.Join(dir, "pid")}, tt.extra...)
			code, _, stderr := runBackend(t, be, nil, args...)
			if code == 0 {
				t.Fatalf("nkp-swtpm -d exited 0")
			}
			for _, w := range tt.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr %q does not contain %q", stderr, w)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "pid")); err == nil {
				t.Errorf("a pid file was written for a daemon that did not start")
			}
		})
	}
	after := stateFiles(t, encrypted)
	for name, b := range before {
		if !bytes.Equal(after[name], b) {
			t.Errorf("state file %s changed by the failed start", name)
		}
	}
}

// TestPrintCapabilitiesAndStates runs the probes libvirt and swtpm_setup run.
func TestPrintCapabilitiesAndStates(t *testing.T) {
	forEachBackend(t, func(t *testing.T, be backend) {
		code, out, stderr := runBackend(t, be, nil, "--print-capabilities")
		if code != 0 {
			t.Fatalf("--print-capabilities exited %d: %s", code, stderr)
		}
		var caps struct {
			Type     string   `json:"type"`
			Features []string `json:"features"`
			Version  string   `json:"version"`
		}
		if err := json.Unmarshal([]byte(out), &caps); err != nil {
			t.Fatalf("--print-capabilities is not JSON: %v: %q", err, out)
		}
		feats := strings.Join(caps.Features, " ")
		for _, f := range []string{"tpm-2.0", "cmdarg-pwd-fd", "cmdarg-key-fd", "cmdarg-print-states", "tpm-send-command-header", "flags-opt-startup"} {
			if !strings.Contains(" "+feats+" ", " "+f+" ") {
				t.Errorf("feature %s missing from %v", f, caps.Features)
			}
		}
		if caps.Type != "swtpm" || caps.Version == "" {
			t.Errorf("type %q version %q", caps.Type, caps.Version)
		}

		state := t.TempDir()
		states := func() string {
			t.Helper()
			code, out, stderr := runBackend(t, be, nil, "--print-states", "--tpmstate", "backend-uri=dir://"+state, "--tpm2")
			if code != 0 {
				t.Fatalf("--print-states exited %d: %s", code, stderr)
			}
			return out
		}
		if out := states(); strings.Contains(out, "permall") {
			t.Errorf("--print-states on an empty directory = %q", out)
		}
		p := start(t, be, procOpts{stateDir: state, extra: startupFlags})
		defineIndex(t, p)
		p.Stop()
		if out := states(); !strings.Contains(out, `"name"`) || !strings.Contains(out, "permall") {
			t.Errorf("--print-states after a run = %q, want permall listed", out)
		}
	})
}

// TestBadStateFiles starts a backend on garbage and on truncated state: it must refuse
// to run the TPM, say so, and leave the file as it was.
func TestBadStateFiles(t *testing.T) {
	forEachBackend(t, func(t *testing.T, be backend) {
		good := t.TempDir()
		p := start(t, be, procOpts{stateDir: good, extra: startupFlags})
		defineIndex(t, p)
		p.Stop()
		perm, err := os.ReadFile(filepath.Join(good, "tpm2-00.permall"))
		if err != nil {
			t.Fatalf("no permall after a run: %v", err)
		}
		garbage := make([]byte, len(perm))
		rand.Read(garbage)
		for _, tt := range []struct {
			name string
			data []byte
		}{
			{"garbage", garbage},
			{"truncated", perm[:len(perm)/2]},
			{"empty", []byte{}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				state := t.TempDir()
				f := filepath.Join(state, "tpm2-00.permall")
				if err := os.WriteFile(f, tt.data, 0o600); err != nil {
					t.Fatal(err)
				}
				p := startNoWait(t, be, procOpts{stateDir: state, extra: startupFlags})
				if err := p.Wait(20 * time.Second); err == nil {
					t.Fatalf("%s ran on a %s permall", be.name, tt.name)
				}
				if after, _ := os.ReadFile(f); !bytes.Equal(after, tt.data) {
					t.Errorf("the %s permall was changed", tt.name)
				}
				if be.name == "nkp-swtpm" && !strings.Contains(p.logText(), "permall") {
					t.Errorf("the refusal does not name the state file: %q", p.logText())
				}
			})
		}
	})
}

// TestUnknownOption: an unknown option is refused and named.
func TestUnknownOption(t *testing.T) {
	forEachBackend(t, func(t *testing.T, be backend) {
		code, _, stderr := runBackend(t, be, nil, "--tpm2", "--tpmstate", "dir=/tmp", "--no-such-option")
		if code == 0 {
			t.Fatalf("%s accepted --no-such-option", be.name)
		}
		if be.name == "nkp-swtpm" && !strings.Contains(stderr, "--no-such-option") {
			t.Errorf("stderr %q does not name the option", stderr)
		}
	})
}

// TestRunAs starts a backend as root with --runas nobody: it serves as that user, and
// the state it writes belongs to that user.
func TestRunAs(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, "tpm2_getrandom")
	const uid = 65534 // nobody
	forEachBackend(t, func(t *testing.T, be backend) {
		state, dir := t.TempDir(), sockDir(t)
		for _, d := range []string{state, dir} {
			if err := os.Chown(d, uid, uid); err != nil {
				t.Fatal(err)
			}
		}
		os.Chmod(filepath.Dir(state), 0o755) // t.TempDir's parent is 0700
		p := start(t, be, procOpts{stateDir: state, dir: dir, extra: append([]string{"--runas", "nobody"}, startupFlags...)})
		status, err := os.ReadFile("/proc/" + strconv.Itoa(p.pid()) + "/status")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(line, "Uid:") && strings.Fields(line)[1] != strconv.Itoa(uid) {
				t.Errorf("runs as %q, want uid %d", line, uid)
			}
		}
		mustRun(t, p.TCTI(), "tpm2_getrandom", "--hex", "8")
		defineIndex(t, p)
		p.Stop()
		fi, err := os.Stat(filepath.Join(state, "tpm2-00.permall"))
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != uid {
			t.Errorf("permall owned by uid %d, want %d", st.Uid, uid)
		}
	})
}

// isSocket reports whether path is a unix socket file.
func isSocket(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeSocket != 0
}

// TestTerminate checks -t (exit when the data connection goes away) and
// --ctrl ...,terminate (exit when the control connection goes away), which libvirt and
// QEMU rely on so that no backend outlives its VM.
func TestTerminate(t *testing.T) {
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
	getCaps := []byte{0, 0, 0, 1}
	tests := []struct {
		name  string
		extra []string
		ctrl  bool   // talk on the control socket (else the data socket)
		msg   []byte // one message, then close
		needs string // capability the backend must report
	}{
		{"-t and the data connection closes", []string{"-t"}, false, getRandom, ""},
		{"ctrl terminate and the control connection closes", nil, true, getCaps, "ctrl-opt-terminate"},
	}
	forEachBackend(t, func(t *testing.T, be backend) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if tt.needs != "" && !hasFeature(t, be, tt.needs) {
					t.Skipf("%s does not report %s (newer swtpm releases have it)", be.name, tt.needs)
				}
				dir := sockDir(t)
				o := procOpts{stateDir: t.TempDir(), dir: dir, extra: append(tt.extra, startupFlags...)}
				if tt.ctrl {
					// Replace --ctrl: the last one given wins, in swtpm as in nkp-swtpm.
					o.extra = append(o.extra, "--ctrl", "type=unixio,terminate,path="+filepath.Join(dir, "tpm.sock.ctrl"))
				}
				p := startNoWait(t, be, o)
				// Dialing would count as a connection: wait for the socket files instead.
				e2e.WaitFor(t, 10*time.Second, "socket files", func() bool { return isSocket(p.Ctrl) && isSocket(p.Data) })
				path := p.Data
				if tt.ctrl {
					path = p.Ctrl
				}
				var c net.Conn
				e2e.WaitFor(t, 10*time.Second, "a connection", func() bool {
					var err error
					c, err = netDial(path)
					return err == nil
				})
				if _, err := c.Write(tt.msg); err != nil {
					t.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := c.Read(make([]byte, 64)); err != nil || n < 4 {
					t.Fatalf("no reply: %d bytes, %v", n, err)
				}
				if p.exited() {
					t.Fatalf("exited before the connection closed")
				}
				c.Close()
				p.Wait(10 * time.Second)
			})
		}
	})
}

// hasFeature reports whether the backend lists feature in --print-capabilities.
func hasFeature(t *testing.T, be backend, feature string) bool {
	t.Helper()
	code, out, stderr := runBackend(t, be, nil, "--print-capabilities")
	if code != 0 {
		t.Fatalf("--print-capabilities exited %d: %s", code, stderr)
	}
	return strings.Contains(out, `"`+feature+`"`)
}

// TestReadOnlyStateDir starts a backend on a state directory mounted read-only: it must
// refuse to run rather than run a TPM that cannot save, say why, and leave the state.
func TestReadOnlyStateDir(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, "mount", "umount")
	forEachBackend(t, func(t *testing.T, be backend) {
		src, ro := t.TempDir(), t.TempDir()
		p := start(t, be, procOpts{stateDir: src, extra: startupFlags})
		defineIndex(t, p)
		p.Stop()
		before := stateFiles(t, src)
		if out, err := runTool(t, nil, "mount", "--bind", src, ro); err != nil {
			e2e.Unavailable(t, "cannot bind-mount here: "+out)
		}
		t.Cleanup(func() { runTool(t, nil, "umount", ro) })
		if out, err := runTool(t, nil, "mount", "-o", "remount,bind,ro", ro); err != nil {
			e2e.Unavailable(t, "cannot remount read-only here: "+out)
		}
		p = startNoWait(t, be, procOpts{stateDir: ro, extra: startupFlags})
		if err := p.Wait(20 * time.Second); err == nil {
			t.Fatalf("%s ran on a read-only state directory", be.name)
		}
		if be.name == "nkp-swtpm" && !strings.Contains(p.logText(), "not writable") {
			t.Errorf("the refusal does not say the directory is not writable: %q", p.logText())
		}
		after := stateFiles(t, src)
		for name, b := range before {
			if !bytes.Equal(after[name], b) {
				t.Errorf("state file %s changed", name)
			}
		}
	})
}

// TestInheritedListener hands the backend a listening unix socket on fd 3
// (--ctrl type=unixio,fd=3), as a supervisor that creates the socket with the right
// owner does, and a listening data socket on fd 4 (--server type=unixio,fd=4).
func TestInheritedListener(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "tpm2_getrandom")
	forEachBackend(t, func(t *testing.T, be backend) {
		dir := sockDir(t)
		ctrl, data := filepath.Join(dir, "tpm.sock.ctrl"), filepath.Join(dir, "tpm.sock")
		var files []*os.File
		for _, path := range []string{ctrl, data} {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			f, err := l.File()
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close() // the dup in f stays open and listening
			t.Cleanup(func() { f.Close() })
			files = append(files, f)
		}
		var stderr bytes.Buffer
		vtpmproc.StartT(t, be.get(t), vtpmproc.Options{
			Args: cmdline.Options{
				TPM2:   true,
				Ctrl:   &cmdline.Channel{Type: cmdline.TypeUnixIO, ListenFD: 3},
				Server: &cmdline.Channel{Type: cmdline.TypeUnixIO, ListenFD: 4},
				State:  &cmdline.StateOptions{Dir: t.TempDir()},
				Flags:  cmdline.FlagsOptions{NotNeedInit: true, Startup: cmdline.StartupClear},
				Log:    &cmdline.LogOptions{File: "-"},
			},
			Files:  files,
			Output: &stderr,
		})
		mustRun(t, []string{"TPM2TOOLS_TCTI=swtpm:path=" + data}, "tpm2_getrandom", "--hex", "8")
		if out := mustRun(t, nil, "swtpm_ioctl", "--unix", ctrl, "-c"); !strings.Contains(out, "ptm capability") {
			t.Errorf("swtpm_ioctl -c over the inherited control socket = %q (stderr %s)", out, stderr.String())
		}
	})
}
