package seccomp

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Filter is a filter built for this process and this kernel, ready to install.
type Filter struct {
	action Action
	prog   *unix.SockFprog // nil for None
}

// New checks that the kernel offers what the filter for a needs and builds it, so that
// a caller can refuse to start before it opens anything; Install puts it in later.
// Errors name the reason and the way out: a kernel without seccomp filters, or
// without the action, is an error for Kill and Log, never a silent pass. None gives a
// Filter whose Install does nothing. The filter is bound to this process (its pid).
func New(a Action) (*Filter, error) {
	if a == None {
		return &Filter{action: None}, nil
	}
	prog, err := program(a, os.ReadFile)
	if err != nil {
		return nil, err
	}
	return &Filter{action: a, prog: prog}, nil
}

// Action returns the action the filter was built for.
func (f *Filter) Action() Action { return f.action }

// Install sets no_new_privs and installs the filter on every thread of this process
// (TSYNC). It cannot be undone. A None filter installs nothing.
//
// It loads the program itself rather than with go-seccomp-bpf's LoadFilter, which
// does not keep the prctl and the seccomp call on one OS thread and ignores the
// thread id TSYNC returns when a thread cannot be synchronised.
func (f *Filter) Install() error {
	if f.prog == nil {
		return nil
	}
	return load(f.prog)
}

// Install is New followed by Filter.Install.
func Install(a Action) error {
	f, err := New(a)
	if err != nil {
		return err
	}
	return f.Install()
}

// program checks that the kernel offers what the filter for a needs (read gives
// /proc/sys/kernel/seccomp/actions_avail) and returns the filter as the kernel takes it.
func program(a Action, read func(string) ([]byte, error)) (*unix.SockFprog, error) {
	_, name, err := a.ret()
	if err != nil {
		return nil, err
	}
	avail, err := actionsAvail(read)
	if err != nil {
		return nil, err
	}
	for _, need := range []string{name, "errno"} {
		if !avail[need] {
			return nil, fmt.Errorf("seccomp: the kernel does not offer the filter action %q (see /proc/sys/kernel/seccomp/actions_avail): run with --seccomp action=none to serve without a filter", need)
		}
	}
	filter, err := instructions(a, os.Getpid())
	if err != nil {
		return nil, err
	}
	if len(filter) == 0 || len(filter) > unix.BPF_MAXINSNS {
		return nil, fmt.Errorf("seccomp: the %v filter has %d instructions, want 1 to the kernel's %d", a, len(filter), unix.BPF_MAXINSNS)
	}
	return &unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}, nil
}

// load sets no_new_privs and loads prog with TSYNC, both from one OS thread: the
// kernel sets no_new_privs on the threads it synchronises when the caller has it.
func load(prog *unix.SockFprog) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("seccomp: set no_new_privs: %w: the kernel refused prctl(PR_SET_NO_NEW_PRIVS); run with --seccomp action=none to serve without a filter", err)
	}
	tid, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(prog)))
	runtime.KeepAlive(prog)
	switch {
	case errors.Is(errno, unix.ENOSYS):
		return fmt.Errorf("seccomp: the kernel has no seccomp (%w): run with --seccomp action=none to serve without a filter", errno)
	case errors.Is(errno, unix.EINVAL):
		return fmt.Errorf("seccomp: the kernel refused the filter (%w; seccomp filters or TSYNC missing, kernel older than 3.17 or built without CONFIG_SECCOMP_FILTER): run with --seccomp action=none to serve without a filter", errno)
	case errno != 0:
		return fmt.Errorf("seccomp: load the filter: %w: run with --seccomp action=none to serve without a filter", errno)
	case tid != 0:
		return fmt.Errorf("seccomp: thread %d could not be given the filter (it has an incompatible one); no thread was changed: run with --seccomp action=none to serve without a filter", tid)
	}
	return nil
}
