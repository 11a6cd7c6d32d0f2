package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

// backend is one vTPM program under test, started as `<Path> socket ...` with the
// swtpm command line; its Name is the column heading, e.g. "swtpm 0.7.1".
type backend = vtpmproc.Backend

// keyPassing says how the state key reaches the process: both keep it out of
// argv and the environment.
type keyPassing string

const (
	keyByFD   keyPassing = "fd"   // --key fd=3: the 0600 key file opened and inherited
	keyByFile keyPassing = "file" // --key file=PATH: the 0600 key file's path
)

// instance is one running backend process with its own state directory and
// sockets.
type instance struct {
	proc *vtpmproc.Proc
	dir  string // holds state/, ctrl.sock, data.sock, log
	ctrl string
	data string
}

// pid is the backend's process id.
func (in *instance) pid() int { return in.proc.PID() }

// startInstance starts b on dir (created if missing; an existing state/ is
// reused). It returns once the process runs, not when it is ready.
func startInstance(b backend, dir, keyFile string, kp keyPassing) (*instance, error) {
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		return nil, fmt.Errorf("instance %s: state directory: %w", dir, err)
	}
	in := &instance{
		dir:  dir,
		ctrl: filepath.Join(dir, "ctrl.sock"),
		data: filepath.Join(dir, "data.sock"),
	}
	for _, s := range []string{in.ctrl, in.data} {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("instance %s: stale socket: %w", s, err)
		}
	}
	args := cmdline.Options{
		TPM2:   true,
		State:  &cmdline.StateOptions{Dir: state, Mode: 0o600},
		Ctrl:   &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: in.ctrl},
		Server: &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: in.data},
		Flags:  cmdline.FlagsOptions{NotNeedInit: true, Startup: cmdline.StartupClear},
	}
	var files []*os.File
	switch kp {
	case keyByFD:
		f, err := os.Open(keyFile)
		if err != nil {
			return nil, fmt.Errorf("instance %s: key file: %w", dir, err)
		}
		defer f.Close() // the child has its own copy as fd 3
		files = []*os.File{f}
		args.Key = &cmdline.KeyOptions{FD: 3, Mode: "aes-256-cbc"}
	case keyByFile:
		args.Key = &cmdline.KeyOptions{File: keyFile, Mode: "aes-256-cbc"}
	default:
		return nil, fmt.Errorf("key passing %q: want fd or file", kp)
	}
	logf, err := os.OpenFile(filepath.Join(dir, "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("instance %s: log file: %w", dir, err)
	}
	defer logf.Close()
	in.proc, err = vtpmproc.Start(b, vtpmproc.Options{Args: args, Files: files, Output: logf, Pdeathsig: true})
	if err != nil {
		return nil, err
	}
	return in, nil
}

// exited reports whether the process has ended.
func (in *instance) exited() bool { return in.proc.Exited() }

// logTail returns the end of the instance's log, for error messages.
func (in *instance) logTail() string {
	b, _ := os.ReadFile(filepath.Join(in.dir, "log"))
	if len(b) > 600 {
		b = b[len(b)-600:]
	}
	return strings.TrimSpace(string(b))
}

// ctrl command codes of the swtpm control channel.
const (
	cmdGetCapability = 0x01
	cmdShutdown      = 0x03
)

// ctrlCall sends one control command without a body and reads n reply bytes.
func ctrlCall(c net.Conn, code uint32, n int) ([]byte, error) {
	var req [4]byte
	binary.BigEndian.PutUint32(req[:], code)
	if _, err := c.Write(req[:]); err != nil {
		return nil, err
	}
	rsp := make([]byte, n)
	if _, err := io.ReadFull(c, rsp); err != nil {
		return nil, err
	}
	if rc := binary.BigEndian.Uint32(rsp); rc != 0 {
		return rsp, fmt.Errorf("control command 0x%x: result 0x%x", code, rc)
	}
	return rsp, nil
}

// probeReady connects to the control socket and asks GET_CAPABILITY once.
// It returns the open connection when the backend answered.
func (in *instance) probeReady() (net.Conn, error) {
	c, err := net.Dial("unix", in.ctrl)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := ctrlCall(c, cmdGetCapability, 8); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// waitReady polls the control socket until GET_CAPABILITY is answered, the
// process exits or ctx ends. The poll interval is 100 µs, slept with
// nanosleep(2): this is the measurement of start-to-ready, so it has to be
// fine-grained.
func (in *instance) waitReady(ctx context.Context) (net.Conn, error) {
	for {
		c, err := in.probeReady()
		if err == nil {
			return c, nil
		}
		if in.exited() {
			return nil, fmt.Errorf("instance %s exited before it was ready (%v); log: %s", in.dir, in.proc.Err(), in.logTail())
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("instance %s not ready: %w (last error: %v); log: %s", in.dir, ctx.Err(), err, in.logTail())
		}
		// A real 100 µs sleep of this thread: a Go timer (time.After) sleeps in the
		// netpoller, whose waits are whole milliseconds, which put every start on a
		// ~1.1 ms grid when the tool is pinned to one CPU.
		ts := syscall.NsecToTimespec(int64(100 * time.Microsecond))
		for syscall.Nanosleep(&ts, &ts) == syscall.EINTR {
		}
	}
}

// stop sends CMD_SHUTDOWN over ctrl (if given) and waits for the process to
// end, killing it when it does not within the timeout.
func (in *instance) stop(ctrl net.Conn, timeout time.Duration) error {
	if ctrl != nil {
		ctrl.SetDeadline(time.Now().Add(timeout))
		_, _ = ctrlCall(ctrl, cmdShutdown, 4)
		ctrl.Close()
	} else {
		in.proc.Signal(syscall.SIGTERM)
	}
	if _, ok := in.proc.WaitExit(timeout); !ok {
		in.proc.Kill()
		return fmt.Errorf("instance %s did not exit within %v of SHUTDOWN; killed", in.dir, timeout)
	}
	return nil
}

// memory is what /proc/PID/smaps_rollup reports, in KiB.
type memory struct{ RSS, PSS int64 }

// readMemory parses Rss and Pss from an smaps_rollup file.
func readMemory(pid int) (memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return memory{}, fmt.Errorf("memory of pid %d: %w", pid, err)
	}
	return parseSmapsRollup(b)
}

func parseSmapsRollup(b []byte) (memory, error) {
	var m memory
	var seen int
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		v, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return memory{}, fmt.Errorf("smaps_rollup line %q: %w", sc.Text(), err)
		}
		switch f[0] {
		case "Rss:":
			m.RSS, seen = v, seen|1
		case "Pss:":
			m.PSS, seen = v, seen|2
		}
	}
	if seen != 3 {
		return memory{}, errors.New("smaps_rollup: no Rss and Pss lines")
	}
	return m, nil
}

// cpuTime returns the CPU time a process has run so far: the sum over its
// threads of the first field of /proc/PID/task/TID/schedstat (nanoseconds).
// Unlike wall time, it hardly depends on how loaded the machine is. Threads
// that already exited are not counted (Go and swtpm keep theirs).
func cpuTime(pid int) (time.Duration, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, fmt.Errorf("CPU time of pid %d: %w", pid, err)
	}
	var sum time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // the thread just ended
		}
		if err != nil {
			return 0, fmt.Errorf("CPU time of pid %d: %w", pid, err)
		}
		d, err := parseSchedstat(b)
		if err != nil {
			return 0, fmt.Errorf("CPU time of pid %d thread %s: %w", pid, t.Name(), err)
		}
		sum += d
	}
	return sum, nil
}

func parseSchedstat(b []byte) (time.Duration, error) {
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 0, errors.New("schedstat: empty")
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil || ns < 0 {
		return 0, fmt.Errorf("schedstat %q: not a CPU time", f[0])
	}
	return time.Duration(ns), nil
}
