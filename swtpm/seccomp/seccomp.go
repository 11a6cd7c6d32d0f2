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
// Install sets no_new_privs and applies the filter to every thread of the process
// (SECCOMP_FILTER_FLAG_TSYNC; the kernel also sets no_new_privs on the threads it
// synchronises). Threads created later inherit it. It cannot be removed.
//
// Only cmd/nkp-swtpm (through swtpm/cli) installs it, once everything that needs a
// denied call is done (daemonizing, --runas, sockets, state lock, pid file) and before
// the first byte from a client is read.
package seccomp

import (
	"fmt"
	"strings"

	libseccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
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
func (a Action) ret() (libseccomp.Action, string, error) {
	switch a {
	case Kill:
		return libseccomp.ActionKillProcess, "kill_process", nil
	case Log:
		return libseccomp.ActionLog, "log", nil
	}
	return 0, "", fmt.Errorf("seccomp: action %v installs no filter", a)
}

// denied lists the calls denied whatever their arguments. A name the architecture
// does not have is left out (as swtpm's #ifdef __NR_... does).
var denied = []string{
	// Process creation and program execution (clone is narrowed below).
	"fork", "vfork", "execve", "execveat",
	// System administration: clocks, mounts, swap, reboot, kexec, modules, namespaces.
	"capset", "pivot_root", "chroot", "settimeofday", "clock_adjtime", "clock_settime",
	"adjtimex", "mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick",
	"move_mount", "open_tree", "mount_setattr", "swapon", "swapoff", "reboot",
	"kexec_load", "kexec_file_load", "unshare", "setns", "kcmp", "init_module",
	"finit_module", "delete_module", "seccomp", "_sysctl", "acct", "quotactl",
	"quotactl_fd", "sethostname", "setdomainname", "vhangup", "syslog", "lookup_dcookie",
	"iopl", "ioperm", "sysfs", "personality",
	// Other processes and the kernel's attack surface.
	"ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
	"tkill", "pidfd_send_signal",
	"bpf", "perf_event_open", "userfaultfd", "open_by_handle_at", "name_to_handle_at",
	"migrate_pages", "move_pages", "io_uring_setup", "io_uring_enter",
	"io_uring_register", "add_key", "request_key", "keyctl",
	// SysV and POSIX IPC.
	"semget", "semop", "semtimedop", "semctl", "shmget", "shmat", "shmctl", "shmdt",
	"msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
	"mq_timedreceive", "mq_notify", "mq_getsetattr",
	// Scheduling and resources of this or other processes.
	"capget", "getpriority", "setpriority", "sched_setparam", "sched_setscheduler",
	"sched_setaffinity", "sched_setattr", "setrlimit", "ioprio_set", "ioprio_get",
	// File and event facilities nkp-swtpm does not use.
	"readahead", "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
	"fanotify_init", "fanotify_mark", "splice", "tee", "vmsplice", "signalfd",
	"signalfd4", "eventfd", "eventfd2", "timerfd_settime", "timerfd_gettime", "mknod",
	"mknodat", "io_setup", "io_destroy", "io_getevents", "io_pgetevents", "io_submit",
	"io_cancel",
	// Extended attributes.
	"setxattr", "lsetxattr", "fsetxattr", "getxattr", "lgetxattr", "fgetxattr",
	"listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr",
	"fremovexattr",
	// Identity changes (--runas is done before the filter).
	"setuid", "setgid", "setpgid", "setsid", "setreuid", "setregid", "setgroups",
	"setresuid", "setresgid", "setfsuid", "setfsgid",
	// Obsolete or unimplemented.
	"create_module", "get_kernel_syms", "query_module", "uselib", "nfsservctl",
	"getpmsg", "putpmsg", "afs_syscall", "tuxcall", "security", "set_thread_area",
	"get_thread_area", "epoll_ctl_old", "epoll_wait_old", "vserver", "ustat",
}

// prSetVMA is PR_SET_VMA, the one prctl option the Go runtime uses while running.
const prSetVMA = 0x53564d41

// policy is the filter for action a on this architecture, for process pid.
func policy(a Action, pid int) ([]bpf.Instruction, error) {
	act, _, err := a.ret()
	if err != nil {
		return nil, err
	}
	info, err := arch.GetInfo("")
	if err != nil {
		return nil, fmt.Errorf("seccomp: %w: run with --seccomp action=none on this architecture", err)
	}
	var names []string
	for _, n := range denied {
		if _, ok := info.SyscallNames[n]; ok {
			names = append(names, n)
		}
	}
	narrowed := []libseccomp.NameWithConditions{
		// A new thread has CLONE_THREAD; a new process does not.
		{Name: "clone", Conditions: libseccomp.ArgumentConditions{
			{Argument: 0, Operation: libseccomp.BitsNotSet, Value: unix.CLONE_THREAD}}},
		{Name: "prctl", Conditions: libseccomp.ArgumentConditions{
			{Argument: 0, Operation: libseccomp.NotEqual, Value: prSetVMA}}},
	}
	// Signals only to this process: the first argument of each is the target's pid.
	for _, n := range []string{"kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"} {
		narrowed = append(narrowed, libseccomp.NameWithConditions{Name: n, Conditions: libseccomp.ArgumentConditions{
			{Argument: 0, Operation: libseccomp.NotEqual, Value: uint64(pid)}}})
	}
	narrowed = append(narrowed, []libseccomp.NameWithConditions{
		// prlimit64(0, resource, NULL, &old) reads this process' limit.
		{Name: "prlimit64", Conditions: libseccomp.ArgumentConditions{
			{Argument: 0, Operation: libseccomp.NotEqual, Value: 0}}},
		{Name: "prlimit64", Conditions: libseccomp.ArgumentConditions{
			{Argument: 2, Operation: libseccomp.NotEqual, Value: 0}}},
	}...)
	p := libseccomp.Policy{
		DefaultAction: libseccomp.ActionAllow,
		Syscalls: []libseccomp.SyscallGroup{
			{Names: names, NamesWithCondtions: narrowed, Action: act},
		},
	}
	if _, ok := info.SyscallNames["clone3"]; ok {
		p.Syscalls = append(p.Syscalls, libseccomp.SyscallGroup{
			Names:  []string{"clone3"},
			Action: libseccomp.ActionErrno | libseccomp.Action(unix.ENOSYS),
		})
	}
	prog, err := p.Assemble()
	if err != nil {
		return nil, fmt.Errorf("seccomp: assemble the %s filter: %w", info.Name, err)
	}
	// The library lets a foreign ABI (i386 on x86-64) through to the default action,
	// allow; libseccomp, which swtpm uses, kills it. Deny it first.
	head := []bpf.Instruction{
		bpf.LoadAbsolute{Off: offArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(info.ID), SkipTrue: 1},
		bpf.RetConstant{Val: uint32(act)},
	}
	return append(head, prog...), nil
}

// offArch is the offset of the arch field in struct seccomp_data.
const offArch = 4

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
