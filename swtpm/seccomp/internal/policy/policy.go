// Package policy is nkp-swtpm's seccomp policy as go-seccomp-bpf assembles it: the
// list of denied calls, the narrowed ones, and the generator of the table that package
// swtpm/seccomp installs on amd64 (zfilter_amd64.go, so that the program does not link
// go-seccomp-bpf, whose syscall tables cost about 4 ms and 160 KB at every start).
// Package swtpm/seccomp documents what the filter does; only it imports this package
// (at run time on other architectures, in tests and in its generator).
package policy

import (
	"bytes"
	"fmt"
	"go/format"
	"runtime"

	libseccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// The SECCOMP_RET_* values of a denied call.
const (
	RetKillProcess = uint32(libseccomp.ActionKillProcess)
	RetLog         = uint32(libseccomp.ActionLog)
)

// PIDPlaceholder stands for the process' pid in a generated program: the argument
// compares of the signal calls hold it, and swtpm/seccomp puts the real pid there
// (above any Linux pid, PID_MAX_LIMIT being 2^22).
const PIDPlaceholder = 0x7ffff00d

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

// PRSetVMA is PR_SET_VMA, the one prctl option the Go runtime uses while running.
const PRSetVMA = 0x53564d41

// Build returns the filter for this architecture (runtime.GOARCH) whose denied
// calls return ret (RetKillProcess or RetLog), for process pid.
func Build(ret uint32, pid uint32) ([]bpf.Instruction, error) {
	if ret != RetKillProcess && ret != RetLog {
		return nil, fmt.Errorf("seccomp: denied calls must return kill_process or log, not %#x", ret)
	}
	act := libseccomp.Action(ret)
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
			{Argument: 0, Operation: libseccomp.NotEqual, Value: PRSetVMA}}},
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

// Source returns the Go source of zfilter_amd64.go for the running architecture:
// the Kill and Log programs built for PIDPlaceholder and the indices of the
// instructions that compare with it.
func Source() ([]byte, error) {
	var progs [2][]bpf.RawInstruction
	var slots [2][]int
	for i, ret := range []uint32{RetKillProcess, RetLog} {
		insts, err := Build(ret, PIDPlaceholder)
		if err != nil {
			return nil, err
		}
		raw, err := bpf.Assemble(insts)
		if err != nil {
			return nil, fmt.Errorf("seccomp: assemble: %w", err)
		}
		for j, in := range raw {
			if in.K == PIDPlaceholder {
				if in.Op&0x07 != unix.BPF_JMP {
					return nil, fmt.Errorf("seccomp: instruction %d holds the pid placeholder but is not a jump (%#x)", j, in.Op)
				}
				slots[i] = append(slots[i], j)
			}
		}
		progs[i] = raw
	}
	if fmt.Sprint(slots[0]) != fmt.Sprint(slots[1]) || len(progs[0]) != len(progs[1]) {
		return nil, fmt.Errorf("seccomp: the kill and log programs differ in shape")
	}
	if len(slots[0]) == 0 {
		return nil, fmt.Errorf("seccomp: no instruction compares with the pid")
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "// Code generated by go run ./internal/gen; DO NOT EDIT.\n\n")
	fmt.Fprintf(&b, "package seccomp\n\nimport \"golang.org/x/sys/unix\"\n\n")
	fmt.Fprintf(&b, "// generated is the filter of package internal/policy for %s.\n", runtime.GOARCH)
	fmt.Fprintf(&b, "var generated = genFilter{\n\tarch: %q,\n\tpidSlots: %#v,\n", runtime.GOARCH, slots[0])
	for i, name := range []string{"kill", "log"} {
		fmt.Fprintf(&b, "\t%s: []unix.SockFilter{\n", name)
		for _, in := range progs[i] {
			fmt.Fprintf(&b, "\t\t{Code: %#04x, Jt: %d, Jf: %d, K: %#x},\n", in.Op, in.Jt, in.Jf, in.K)
		}
		fmt.Fprintf(&b, "\t},\n")
	}
	fmt.Fprintf(&b, "}\n")
	return format.Source(b.Bytes())
}
