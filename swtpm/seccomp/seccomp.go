// Package seccomp builds and installs nkp-swtpm's seccomp filter, what
// `nkp-swtpm socket --seccomp action=none|log|kill` selects.
//
// The filter is a denylist modelled on swtpm's (src/swtpm/seccomp_profile.c, the
// non-CUSE profile): process creation and exec, ptrace, mounts, module loading, reboot,
// kexec, clock setting, swap, chroot/pivot_root, namespaces, personality, keyrings,
// SysV and POSIX IPC, xattrs, inotify, splice, uid/gid changes, and others, plus what
// swtpm's list predates (bpf, perf_event_open, userfaultfd, io_uring, execveat, the new
// mount API, process_vm_readv/writev, pidfd_getfd, open_by_handle_at). A denied call
// kills the whole process (SECCOMP_RET_KILL_PROCESS, the process dies of SIGSYS) or,
// with Log, is allowed and logged by the kernel (SECCOMP_RET_LOG). Calls made under a
// foreign ABI (i386 int 0x80 on x86-64) get the same action as a denied call; x32 calls
// fail with ENOSYS.
//
// Signals reach only this process: kill, tgkill, rt_sigqueueinfo and rt_tgsigqueueinfo
// are allowed only when their first argument is this process' pid (kill(0, …) and
// kill(-1, …), a process group or every process, are denied; Go's preemption and crash
// signals use tgkill and kill on its own pid), and tkill (a thread id of any process)
// and pidfd_send_signal (a pidfd of any process) are denied outright. swtpm 0.7.1
// allows all six; under libvirt every vTPM runs as the same user, so without this one
// compromised vTPM could signal the others.
//
// A Go program needs a few calls swtpm's list denies, so these are narrowed instead
// of denied: clone only with CLONE_THREAD (Go and glibc threads; a new process is
// denied), prctl only with PR_SET_VMA (Go names its heap mappings), prlimit64 only to
// read this process' limits (glibc's getrlimit), and sigaltstack is allowed (Go sets
// one per thread). clone3 passes its flags in memory, where a filter cannot read them:
// it fails with ENOSYS with either action, and glibc and Go fall back to clone, whose
// flags are checked. Every other call is allowed.
//
// The policy lives in package internal/policy, which lays the program out as a binary
// search over the call numbers it names (go-seccomp-bpf gives the numbers, and its
// linear program for the same policy is the reference a test compares every
// decision with): the kernel evaluates the filter for every call number when it is
// installed, and a search of about 20 instructions instead of up to 200 compares
// halves what the install costs a start (about 150 → 75 µs; BenchmarkInstall in
// internal/policy measures it). On amd64 the program is generated from it at build time (zfilter_amd64.go, `go
// generate`; a test checks that it matches), so nkp-swtpm neither links go-seccomp-bpf
// nor builds the filter at every start (about 4 ms and 160 KB of syscall tables); the
// pid is put into its signal compares when the filter is made. Other architectures
// assemble it at start.
//
// Install sets no_new_privs and applies the filter to every thread of the process
// (SECCOMP_FILTER_FLAG_TSYNC; the kernel also sets no_new_privs on the threads it
// synchronises). Threads created later inherit it. It cannot be removed.
//
// Only cmd/nkp-swtpm (through swtpm/cli) installs it, once everything that needs a
// denied call is done (daemonizing, --runas, sockets, state lock, pid file) and before
// the first byte from a client is read.
//
// The package prepends the ABI check and loads the program itself (prctl and
// seccomp(2) on one locked OS thread; a thread TSYNC cannot synchronise is an error).
// The kernel's actions are checked in /proc/sys/kernel/seccomp/actions_avail first: a
// missing seccomp or action is an error naming --seccomp action=none, never a silent
// pass.
//
// Code that runs after Install (the server, libtpms, state writes, lazy opening of
// the state) must not start processes, change ids, or use splice, eventfd, inotify
// or xattrs. The check is go test ./swtpm/seccomp (a BPF interpreter table, and
// re-executed children that die of SIGSYS) and the end-to-end suites, which run
// under the default filter; --seccomp action=log plus `dmesg | grep type=1326` lists
// what kill would kill.
package seccomp

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Action is what happens when the process makes a denied system call.
type Action int

const (
	// Kill kills the process with SIGSYS (SECCOMP_RET_KILL_PROCESS). swtpm's default.
	Kill Action = iota
	// Log allows the call and has the kernel log it (SECCOMP_RET_LOG, see
	// /proc/sys/kernel/seccomp/actions_logged): to find out what Kill would kill.
	Log
	// None installs no filter.
	None
)

// String returns the action's name as --seccomp action= takes it.
func (a Action) String() string {
	switch a {
	case Kill:
		return "kill"
	case Log:
		return "log"
	case None:
		return "none"
	}
	return fmt.Sprintf("Action(%d)", int(a))
}

// ParseAction returns the Action named "kill", "log" or "none" (swtpm's values of
// --seccomp action=).
func ParseAction(s string) (Action, error) {
	for _, a := range []Action{Kill, Log, None} {
		if s == a.String() {
			return a, nil
		}
	}
	return 0, fmt.Errorf("seccomp: unknown action %q: accepted are kill, log and none", s)
}

// ret is the SECCOMP_RET_* value of a denied call under a, and the name of that
// action in /proc/sys/kernel/seccomp/actions_avail.
func (a Action) ret() (uint32, string, error) {
	switch a {
	case Kill:
		return unix.SECCOMP_RET_KILL_PROCESS, "kill_process", nil
	case Log:
		return unix.SECCOMP_RET_LOG, "log", nil
	}
	return 0, "", fmt.Errorf("seccomp: action %v installs no filter", a)
}

// actionsAvail reads which actions the kernel knows; errors name the file.
func actionsAvail(read func(string) ([]byte, error)) (map[string]bool, error) {
	const path = "/proc/sys/kernel/seccomp/actions_avail"
	b, err := read(path)
	if err != nil {
		return nil, fmt.Errorf("seccomp: the kernel has no seccomp filters or is older than 4.14 (%w): run with --seccomp action=none to serve without a filter", err)
	}
	avail := map[string]bool{}
	for _, f := range strings.Fields(string(b)) {
		avail[f] = true
	}
	return avail, nil
}
