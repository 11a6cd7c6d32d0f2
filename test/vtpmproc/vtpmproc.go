// Package vtpmproc starts vTPM processes for nkp's end-to-end tests and the swtpm
// benchmark: Debian's swtpm or nkp-swtpm, or any program that takes swtpm's `socket`
// command line. It is the one Backend type and the one launcher of test/swtpmtools,
// test/vtpm and test/bench/swtpmbench: the command line is built and checked by
// swtpm/cmdline, fds are inherited under fixed numbers, the process is reaped by one
// goroutine, and callers wait for its sockets with a bound instead of sleeping.
// StartHostTPM runs one as a machine's own TPM (tests of hostd and the provider's
// --root-key-tpm).
//
// Only test code and benchmark commands import it. It links no cgo.
package vtpmproc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// Backend is a vTPM program run as `Path socket ARGS...`.
type Backend struct {
	Name string // how tests and reports name it: "swtpm", "nkp-swtpm", a column heading
	Path string // the program; looked up in PATH when it has no slash
}

// Swtpm returns Debian's swtpm from PATH.
func Swtpm() (Backend, error) {
	p, err := exec.LookPath("swtpm")
	if err != nil {
		return Backend{}, fmt.Errorf("swtpm: %w (install swtpm: make setup)", err)
	}
	return Backend{Name: "swtpm", Path: p}, nil
}

// Options says how to start a backend.
type Options struct {
	// Args is the command line after "socket", built and checked by cmdline.Build.
	Args cmdline.Options
	// Extra is appended to Args unchecked: for tests of command lines that Build
	// refuses or cannot write (and of the backends' own refusals).
	Extra []string
	// Files are inherited as fd 3, 4, ... The caller keeps and closes its copies.
	Files []*os.File
	// Dir is the working directory ("": this process's).
	Dir string
	// Output receives stdout and stderr (nil: discarded).
	Output io.Writer
	// Pdeathsig kills the backend when the thread that started it exits, so that a
	// benchmark stopped with ^C leaves none behind.
	Pdeathsig bool
}

// Proc is a started backend, reaped by its own goroutine.
type Proc struct {
	Backend Backend
	Argv    []string // the full command line, program first

	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, valid once done is closed
}

// Start starts b with o and returns once the process runs (not once it serves; see
// WaitListening).
func Start(b Backend, o Options) (*Proc, error) {
	args, err := cmdline.Build(&o.Args)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", b.Name, err)
	}
	args = append(append([]string{"socket"}, args...), o.Extra...)
	cmd := exec.Command(b.Path, args...)
	cmd.ExtraFiles = o.Files
	cmd.Dir = o.Dir
	cmd.Stdout, cmd.Stderr = o.Output, o.Output
	if o.Pdeathsig {
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", b.Name, b.Path, err)
	}
	p := &Proc{Backend: b, Argv: cmd.Args, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID is the process's id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Done is closed once the process has ended and was reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is the process's exit error (nil for exit code 0); valid once Done is closed.
func (p *Proc) Err() error {
	<-p.done
	return p.err
}

// Signal sends sig to the process unless it has ended.
func (p *Proc) Signal(sig os.Signal) error {
	if p.Exited() {
		return nil
	}
	return p.cmd.Process.Signal(sig)
}

// WaitExit waits up to timeout for the process to end by itself and returns its exit
// error; ok is false when it still runs.
func (p *Proc) WaitExit(timeout time.Duration) (err error, ok bool) {
	select {
	case <-p.done:
		return p.err, true
	case <-time.After(timeout):
		return nil, false
	}
}

// Stop ends the process cleanly (SIGTERM: TPM2_Shutdown, state saved, sockets removed)
// and waits up to grace; then it kills it. It returns the exit error, or an error
// saying it had to be killed.
func (p *Proc) Stop(grace time.Duration) error {
	p.Signal(syscall.SIGTERM)
	if err, ok := p.WaitExit(grace); ok {
		return err
	}
	p.Kill()
	return fmt.Errorf("%s (pid %d) did not exit within %v of SIGTERM: killed", p.Backend.Name, p.PID(), grace)
}

// Kill ends the process with SIGKILL and waits until it is reaped.
func (p *Proc) Kill() {
	p.Signal(syscall.SIGKILL)
	<-p.done
}

// ErrExited is returned by WaitListening when the process ended first.
var ErrExited = errors.New("the vTPM process exited")

// WaitListening polls, every few milliseconds for up to timeout, until a connection
// to each address is accepted: "unix:PATH", "tcp:HOST:PORT", or a bare socket path.
// It fails at once, with ErrExited and the exit error, if the process ends first.
func (p *Proc) WaitListening(timeout time.Duration, addrs ...string) error {
	deadline := time.Now().Add(timeout)
	for {
		if p.Exited() {
			return fmt.Errorf("%s: %w (%v) before %s accepted", p.Backend.Name, ErrExited, p.err, strings.Join(addrs, ", "))
		}
		pending := ""
		for _, a := range addrs {
			if !Dialable(a) {
				pending = a
				break
			}
		}
		if pending == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %s does not accept connections after %v", p.Backend.Name, pending, timeout)
		}
		select {
		case <-p.done:
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// Dialable reports whether addr ("unix:PATH", "tcp:HOST:PORT" or a socket path)
// accepts a connection now; the connection is closed at once.
func Dialable(addr string) bool {
	network, a, ok := strings.Cut(addr, ":")
	if !ok || (network != "unix" && network != "tcp") {
		network, a = "unix", addr
	}
	c, err := net.DialTimeout(network, a, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// HostTPM is a backend serving as a machine's own TPM, the device package
// internal/tpmdev opens: TPM 2.0, powered on and started at launch (not-need-init,
// startup-clear), its data and control channels on unix sockets.
type HostTPM struct {
	*Proc
	Data, Ctrl string // the data and control sockets
}

// Spec is the TPM's tpmdev spec: "swtpm:path=DATA,ctrl=CTRL".
func (h *HostTPM) Spec() string { return "swtpm:path=" + h.Data + ",ctrl=" + h.Ctrl }

// StartHostTPM starts b as a host TPM with its state in dir (created with mode 0700;
// another start on the same directory keeps the endorsement seed, so the same EK) and
// its sockets data.sock and ctrl.sock in it, and waits up to timeout until the data
// socket accepts. The control socket is left alone: nkp-swtpm serves its one client
// (hostd, which powers the TPM on) once, so a probe would take that client's place.
// out receives the process's output (nil: discarded). On an error nothing is left
// running; otherwise the caller ends the process (Kill, Stop).
func StartHostTPM(b Backend, dir string, out io.Writer, timeout time.Duration) (*HostTPM, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("host TPM %s: %w", b.Name, err)
	}
	h := &HostTPM{Data: filepath.Join(dir, "data.sock"), Ctrl: filepath.Join(dir, "ctrl.sock")}
	p, err := Start(b, Options{Args: cmdline.Options{
		TPM2:   true,
		Server: &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: h.Data},
		Ctrl:   &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: h.Ctrl},
		State:  &cmdline.StateOptions{Dir: dir},
		Flags:  cmdline.FlagsOptions{NotNeedInit: true, Startup: cmdline.StartupClear},
	}, Output: out})
	if err != nil {
		return nil, fmt.Errorf("host TPM: %w", err)
	}
	if err := p.WaitListening(timeout, h.Data); err != nil {
		p.Kill()
		return nil, fmt.Errorf("host TPM: %w", err)
	}
	h.Proc = p
	return h, nil
}
