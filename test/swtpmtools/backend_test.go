package swtpmtools

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// backend is a program that speaks swtpm's socket interface: Debian's swtpm or
// nkp-swtpm. Every test runs against both, so a test that passes on swtpm shows it
// checks the right thing, and passing on nkp-swtpm shows nkp-swtpm stands in for it.
type backend struct {
	name string
	// get returns the program; it skips or fails t when it is not available.
	get func(t testing.TB) vtpmproc.Backend
}

var backends = []backend{
	{"swtpm", vtpmproc.SwtpmFor},
	{"nkp-swtpm", vtpmproc.NKPSwtpmFor},
}

// argv returns the program and its mode word ("socket").
func (be backend) argv(t *testing.T) []string {
	return []string{be.get(t).Path, "socket"}
}

// forEachBackend runs f as a subtest per backend.
func forEachBackend(t *testing.T, f func(t *testing.T, be backend)) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) { f(t, be) })
	}
}

// sockDir returns a short temporary directory for unix sockets (t.TempDir's paths can
// exceed the 108 bytes of sun_path with long test names).
func sockDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "nkp-st-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// tpmProc is one running backend process with a unix control socket (Ctrl) and a unix
// data socket (Data = Ctrl without ".ctrl", the layout tpm2-tss' swtpm TCTI expects).
type tpmProc struct {
	t        *testing.T
	proc     *vtpmproc.Proc
	Ctrl     string
	Data     string
	StateDir string
	Log      string
	// TCPPort is the data port of a backend started with procOpts.tcp (the control
	// port is TCPPort+1, as tpm2-tss' swtpm TCTI expects); 0 for unix sockets.
	TCPPort int
	// Cwd is the process's working directory, empty at start.
	Cwd    string
	stderr bytes.Buffer
}

// procOpts says how to start a backend.
type procOpts struct {
	stateDir string
	// stateFile is a linear state file (--tpmstate backend-uri=file://), instead of stateDir.
	stateFile string
	dir       string   // socket directory; a new one when empty
	extra     []string // more options (--key, --flags ...)
	noServer  bool     // no --server: the data channel only through SET_DATAFD
	noCtrl    bool     // no --ctrl: a data-only TPM (Ctrl is then unused)
	tcp       bool     // TCP sockets on 127.0.0.1 instead of unix sockets
	files     []*os.File
}

// start runs the backend and waits until both sockets accept connections.
func start(t *testing.T, be backend, o procOpts) *tpmProc {
	t.Helper()
	p := startNoWait(t, be, o)
	addrs := []string{p.ctrlAddr()}
	if !o.noServer {
		addrs = append(addrs, p.dataAddr())
	}
	if err := p.proc.WaitListening(10*time.Second, addrs...); err != nil {
		t.Fatalf("%v\nstderr: %s\nlog: %s", err, p.stderr.String(), p.logText())
	}
	return p
}

// startNoWait runs the backend without waiting for its sockets.
func startNoWait(t *testing.T, be backend, o procOpts) *tpmProc {
	t.Helper()
	prog := be.get(t)
	dir := o.dir
	if dir == "" {
		dir = sockDir(t)
	}
	p := &tpmProc{
		t:        t,
		Data:     filepath.Join(dir, "tpm.sock"),
		Ctrl:     filepath.Join(dir, "tpm.sock.ctrl"),
		StateDir: o.stateDir,
		Log:      filepath.Join(dir, "tpm.log"),
	}
	args := cmdline.Options{
		TPM2:  true,
		Ctrl:  &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: p.Ctrl},
		State: &cmdline.StateOptions{Dir: o.stateDir, File: o.stateFile},
		Log:   &cmdline.LogOptions{File: p.Log, Level: 20},
	}
	if !o.noServer {
		args.Server = &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: p.Data}
	}
	if o.noCtrl {
		args.Ctrl = nil
	}
	if o.tcp {
		p.TCPPort = freePortPair(t)
		args.Ctrl = &cmdline.Channel{Type: cmdline.TypeTCP, Port: p.TCPPort + 1}
		if !o.noServer {
			args.Server = &cmdline.Channel{Type: cmdline.TypeTCP, Port: p.TCPPort}
		}
	}
	p.Cwd = t.TempDir() // nothing may be written here (libtpms' NVChip, for one)
	p.proc = vtpmproc.StartT(t, prog, vtpmproc.Options{
		Args:   args,
		Extra:  o.extra,
		Files:  o.files,
		Dir:    p.Cwd,
		Output: &p.stderr,
	})
	return p
}

// ctrlAddr and dataAddr return the sockets as "unix:PATH" or "tcp:HOST:PORT".
func (p *tpmProc) ctrlAddr() string {
	if p.TCPPort != 0 {
		return fmt.Sprintf("tcp:127.0.0.1:%d", p.TCPPort+1)
	}
	return "unix:" + p.Ctrl
}

func (p *tpmProc) dataAddr() string {
	if p.TCPPort != 0 {
		return fmt.Sprintf("tcp:127.0.0.1:%d", p.TCPPort)
	}
	return "unix:" + p.Data
}

// TCTI returns the environment that points tpm2-tools at the backend.
func (p *tpmProc) TCTI() []string {
	if p.TCPPort != 0 {
		return []string{fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", p.TCPPort)}
	}
	return []string{"TPM2TOOLS_TCTI=swtpm:path=" + p.Data}
}

// freePortPair returns a port P such that P and P+1 were free on 127.0.0.1 a moment ago.
func freePortPair(t *testing.T) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1))
		l.Close()
		if err == nil {
			l2.Close()
			return port
		}
	}
	t.Fatal("no two consecutive free TCP ports on 127.0.0.1")
	return 0
}

func dialable(path string) bool {
	c, err := netDial(path)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (p *tpmProc) exited() bool { return p.proc.Exited() }

// pid is the backend's process id.
func (p *tpmProc) pid() int { return p.proc.PID() }

// Wait waits up to timeout for the process to exit and returns its exit error.
func (p *tpmProc) Wait(timeout time.Duration) error {
	p.t.Helper()
	err, ok := p.proc.WaitExit(timeout)
	if !ok {
		p.t.Fatalf("process %d did not exit within %v; log: %s", p.pid(), timeout, p.logText())
	}
	return err
}

// Stop ends the process with SIGTERM (a clean exit that saves the state) and waits.
func (p *tpmProc) Stop() {
	p.t.Helper()
	if p.exited() {
		return
	}
	var ee *exec.ExitError
	switch err := p.proc.Stop(10 * time.Second); {
	case err == nil:
	case errors.As(err, &ee):
		p.t.Logf("exit after SIGTERM: %v", err)
	default:
		p.t.Fatalf("%v; log: %s", err, p.logText())
	}
}

// Kill ends the process with SIGKILL and waits for it.
func (p *tpmProc) Kill() { p.proc.Kill() }

func (p *tpmProc) logText() string {
	b, _ := os.ReadFile(p.Log)
	return string(b) + p.stderr.String()
}

// runTool runs a tool with a bound on its run time and returns its combined output.
func runTool(t *testing.T, env []string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("%s %s: timed out: %w", name, strings.Join(args, " "), ctx.Err())
	}
	return string(out), err
}

// mustRun is runTool that fails the test on an error.
func mustRun(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	out, err := runTool(t, env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// hexKeyFile writes a fresh random 256-bit key as 64 hex digits (swtpm's --key
// file=...,format=hex, the default) to a new file of mode 0600 and returns its path.
func hexKeyFile(t *testing.T) string {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, []byte(hex.EncodeToString(k)), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// passphraseFile writes a passphrase (swtpm's --pwdfile, for --key pwdfile=...) to a
// new file of mode 0600 and returns its path.
func passphraseFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pwd")
	if err := os.WriteFile(p, []byte("a passphrase\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
