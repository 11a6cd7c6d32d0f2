package swtpmtools

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

func TestMain(m *testing.M) {
	code := m.Run()
	e2e.Cleanup()
	os.Exit(code)
}

// backend is a program that speaks swtpm's socket interface: Debian's swtpm or
// nkp-swtpm. Every test runs against both, so a test that passes on swtpm shows it
// checks the right thing, and passing on nkp-swtpm shows nkp-swtpm stands in for it.
type backend struct {
	name string
	// argv returns the program and its mode word ("socket"); it skips or fails t when
	// the program is not available.
	argv func(t *testing.T) []string
}

var backends = []backend{
	{"swtpm", func(t *testing.T) []string {
		e2e.Require(t, "swtpm")
		return []string{"swtpm", "socket"}
	}},
	{"nkp-swtpm", func(t *testing.T) []string {
		return []string{e2e.BuildBinary(t, "./cmd/nkp-swtpm"), "socket"}
	}},
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
	cmd      *exec.Cmd
	Ctrl     string
	Data     string
	StateDir string
	Log      string
	// TCPPort is the data port of a backend started with procOpts.tcp (the control
	// port is TCPPort+1, as tpm2-tss' swtpm TCTI expects); 0 for unix sockets.
	TCPPort int
	// Cwd is the process's working directory, empty at start.
	Cwd     string
	stderr  bytes.Buffer
	done    chan struct{}
	waitErr error
}

// procOpts says how to start a backend.
type procOpts struct {
	stateDir string
	dir      string   // socket directory; a new one when empty
	extra    []string // more options (--key, --flags ...)
	noServer bool     // no --server: the data channel only through SET_DATAFD
	tcp      bool     // TCP sockets on 127.0.0.1 instead of unix sockets
	files    []*os.File
}

// start runs the backend and waits until both sockets accept connections.
func start(t *testing.T, be backend, o procOpts) *tpmProc {
	t.Helper()
	p := startNoWait(t, be, o)
	e2e.WaitFor(t, 10*time.Second, be.name+" sockets", func() bool {
		if p.exited() {
			t.Fatalf("%s exited early: %v\nstderr: %s\nlog: %s", be.name, p.waitErr, p.stderr.String(), p.logText())
		}
		return p.dialable(p.ctrlAddr()) && (o.noServer || p.dialable(p.dataAddr()))
	})
	return p
}

// startNoWait runs the backend without waiting for its sockets.
func startNoWait(t *testing.T, be backend, o procOpts) *tpmProc {
	t.Helper()
	argv := be.argv(t)
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
		done:     make(chan struct{}),
	}
	ctrl, server := "type=unixio,path="+p.Ctrl, "type=unixio,path="+p.Data
	if o.tcp {
		p.TCPPort = freePortPair(t)
		ctrl = fmt.Sprintf("type=tcp,port=%d", p.TCPPort+1)
		server = fmt.Sprintf("type=tcp,port=%d", p.TCPPort)
	}
	args := append(argv[1:], "--tpm2",
		"--ctrl", ctrl,
		"--tpmstate", "dir="+o.stateDir,
		"--log", "file="+p.Log+",level=20")
	if !o.noServer {
		args = append(args, "--server", server)
	}
	args = append(args, o.extra...)
	p.cmd = exec.Command(argv[0], args...)
	p.Cwd = t.TempDir() // nothing may be written here (libtpms' NVChip, for one)
	p.cmd.Dir = p.Cwd
	p.cmd.Stderr = &p.stderr
	p.cmd.ExtraFiles = o.files
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", be.name, err)
	}
	go func() { p.waitErr = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.Kill() })
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

func (p *tpmProc) dialable(addr string) bool {
	network, a, _ := strings.Cut(addr, ":")
	c, err := net.DialTimeout(network, a, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
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

func (p *tpmProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the process to exit and returns its exit error.
func (p *tpmProc) Wait(timeout time.Duration) error {
	p.t.Helper()
	select {
	case <-p.done:
		return p.waitErr
	case <-time.After(timeout):
		p.t.Fatalf("process %d did not exit within %v; log: %s", p.cmd.Process.Pid, timeout, p.logText())
		return nil
	}
}

// Stop ends the process with SIGTERM (a clean exit that saves the state) and waits.
func (p *tpmProc) Stop() {
	p.t.Helper()
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.Wait(10 * time.Second); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 0 {
			p.t.Logf("exit after SIGTERM: %v", err)
		}
	}
}

// Kill ends the process with SIGKILL and waits for it.
func (p *tpmProc) Kill() {
	if p.exited() {
		return
	}
	p.cmd.Process.Kill()
	<-p.done
}

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
