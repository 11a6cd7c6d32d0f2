package cli

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// envReadyFD tells a daemonized child which fd is the readiness pipe to its parent.
// It carries an fd number, nothing secret.
const envReadyFD = "NKP_SWTPM_READY_FD"

// readyTimeout bounds how long the parent of -d waits for its child to be ready.
const readyTimeout = 30 * time.Second

// daemonize runs this program again in a new session with the same arguments and the
// inherited fds under the same numbers (key fds too: the child reads the key, the
// parent never does), and waits until the child reports on a pipe that it serves, or
// why it could not. It returns the parent's exit code: 0 only once the child is ready.
func daemonize(o *cmdline.Options, args []string, stderr io.Writer) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "nkp-swtpm: --daemon: cannot find own executable: %v\n", err)
		return 1
	}
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(stderr, "nkp-swtpm: --daemon: readiness pipe: %v\n", err)
		return 1
	}
	defer r.Close()
	var extra []*os.File
	for _, fd := range o.InheritedFDs() {
		for len(extra) <= fd-3 {
			extra = append(extra, nil)
		}
		f := os.NewFile(uintptr(fd), "inherited-"+strconv.Itoa(fd))
		if f == nil {
			fmt.Fprintf(stderr, "nkp-swtpm: --daemon: fd %d is not open\n", fd)
			return 1
		}
		extra[fd-3] = f
	}
	readyFD := 3 + len(extra)
	extra = append(extra, w)

	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintf(stderr, "nkp-swtpm: --daemon: %v\n", err)
		return 1
	}
	defer devnull.Close()
	// os.StartProcess, not os/exec: the same fork and exec, without linking os/exec
	// into nkp-swtpm (150 KB less binary).
	proc, err := os.StartProcess(self, append([]string{self}, args...), &os.ProcAttr{
		Env:   append(os.Environ(), envReadyFD+"="+strconv.Itoa(readyFD)),
		Files: append([]*os.File{devnull, devnull, devnull}, extra...), // nil: closed in the child
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		w.Close()
		fmt.Fprintf(stderr, "nkp-swtpm: --daemon: start %s: %v\n", self, err)
		return 1
	}
	w.Close()
	// wait reaps the child and returns what exec.Cmd.Wait would: nil on exit status 0.
	wait := func() error {
		st, err := proc.Wait()
		if err == nil && !st.Success() {
			err = errors.New(st.String())
		}
		return err
	}

	type result struct {
		line string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		done <- result{line, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(readyTimeout):
		proc.Kill()
		wait()
		fmt.Fprintf(stderr, "nkp-swtpm: --daemon: the daemon was not ready within %v and was killed\n", readyTimeout)
		return 1
	}
	if strings.HasPrefix(res.line, "READY") {
		proc.Release()
		return 0
	}
	werr := wait()
	msg := strings.TrimSpace(strings.TrimPrefix(res.line, "ERROR "))
	if msg == "" {
		msg = fmt.Sprintf("the daemon exited before it was ready (%v)", werr)
	}
	fmt.Fprintf(stderr, "nkp-swtpm: %s\n", msg)
	return 1
}

// readyNotifier reports readiness (or the error that prevented it) to the parent of a
// daemonized process. It is a no-op when the process was not started by daemonize.
type readyNotifier struct{ f *os.File }

// childNotifier returns the notifier of a daemonized child and removes the variable
// from the environment so that nothing started later inherits it.
func childNotifier(getenv func(string) string) (*readyNotifier, bool) {
	v := getenv(envReadyFD)
	if v == "" {
		return &readyNotifier{}, false
	}
	os.Unsetenv(envReadyFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return &readyNotifier{}, false
	}
	return &readyNotifier{f: os.NewFile(uintptr(fd), "ready")}, true
}

// Ready tells the parent that the daemon serves.
func (n *readyNotifier) Ready() { n.send("READY\n") }

// Fail tells the parent why the daemon could not start.
func (n *readyNotifier) Fail(err error) {
	if err == nil {
		err = errors.New("unknown error")
	}
	n.send("ERROR " + strings.ReplaceAll(err.Error(), "\n", " ") + "\n")
}

func (n *readyNotifier) send(s string) {
	if n.f == nil {
		return
	}
	io.WriteString(n.f, s)
	n.f.Close()
	n.f = nil
}
