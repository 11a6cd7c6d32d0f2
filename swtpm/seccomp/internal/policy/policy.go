// Package policy is nkp-swtpm's seccomp policy: the list of denied calls, the narrowed
// ones (as go-seccomp-bpf expresses them, whose syscall tables give the numbers), the
// builder of the program (a binary search over the call numbers, see Build), and the
// generator of the table that package swtpm/seccomp installs on amd64
// (zfilter_amd64.go, so that the program does not link go-seccomp-bpf, whose syscall
// tables cost about 4 ms and 160 KB at every start).
// Package swtpm/seccomp documents what the filter does; only it imports this package
// (at run time on other architectures, in tests and in its generator).
package policy

import (
	"bytes"
	"fmt"
	"go/format"
	"runtime"
	"slices"
	"unsafe"

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

// The SECCOMP_RET_* values of the other outcomes.
const (
	retAllow  = uint32(libseccomp.ActionAllow)
	retENOSYS = uint32(libseccomp.ActionErrno) | uint32(unix.ENOSYS)
)

// x32Bit marks a call of the x32 ABI on x86-64 (__X32_SYSCALL_BIT).
const x32Bit = 0x40000000

// Rules returns the policy for the architecture info and process pid as go-seccomp-bpf
// expresses it: the calls denied whatever their arguments (names the architecture
// lacks are left out), and the narrowed calls with the conditions under which they
// are denied. clone3 is not among them: it always fails with ENOSYS.
func Rules(info *arch.Info, pid uint32) (names []string, narrowed []libseccomp.NameWithConditions) {
	for _, n := range denied {
		if _, ok := info.SyscallNames[n]; ok {
			names = append(names, n)
		}
	}
	narrowed = []libseccomp.NameWithConditions{
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
	return names, narrowed
}

// Build returns the filter for this architecture (runtime.GOARCH) whose denied
// calls return ret (RetKillProcess or RetLog), for process pid.
//
// The program checks the ABI (a foreign one gets ret, x32 calls ENOSYS), then finds
// the call number by binary search over the numbers the policy names (clone3, the
// denied and the narrowed calls), so that any call takes about 20 instructions to
// decide rather than a compare with each of some 190 numbers in turn. The kernel runs
// the filter over every call number when it is installed (to cache the calls it always
// allows): with the linear list go-seccomp-bpf assembles that took about 150 µs of
// every start, with the search about 75 (BenchmarkInstall, Linux 6.18, load 4.5:
// `go test -run XXX -bench Install -benchtime 200x ./swtpm/seccomp/internal/policy`).
// The decisions are those of go-seccomp-bpf's program for the same
// policy (TestSameDecisionsAsLinear), without its quirk of comparing an argument
// left in the accumulator with the next call numbers: on amd64 a process whose pid
// was 302 (prlimit64's number) was killed by its first tgkill (Go's preemption
// signal), and one with pid 435 (clone3's) got ENOSYS for signals to itself.
func Build(ret uint32, pid uint32) ([]bpf.Instruction, error) {
	if ret != RetKillProcess && ret != RetLog {
		return nil, fmt.Errorf("seccomp: denied calls must return kill_process or log, not %#x", ret)
	}
	info, err := arch.GetInfo("")
	if err != nil {
		return nil, fmt.Errorf("seccomp: %w: run with --seccomp action=none on this architecture", err)
	}
	names, narrowed := Rules(info, pid)
	blocks := map[uint32][]bpf.Instruction{}
	add := func(name string, block []bpf.Instruction) error {
		nr, ok := info.SyscallNames[name]
		if !ok {
			return fmt.Errorf("seccomp: %s has no system call %s", info.Name, name)
		}
		if _, dup := blocks[uint32(nr)]; dup {
			return fmt.Errorf("seccomp: %s is in the policy twice", name)
		}
		blocks[uint32(nr)] = block
		return nil
	}
	for _, n := range names {
		if err := add(n, []bpf.Instruction{bpf.RetConstant{Val: ret}}); err != nil {
			return nil, err
		}
	}
	// The rules of one call are OR'd: go-seccomp-bpf checks each in turn.
	var order []string
	rules := map[string][]libseccomp.ArgumentConditions{}
	for _, n := range narrowed {
		if _, ok := info.SyscallNames[n.Name]; !ok {
			continue
		}
		if rules[n.Name] == nil {
			order = append(order, n.Name)
		}
		rules[n.Name] = append(rules[n.Name], n.Conditions)
	}
	for _, n := range order {
		block, err := conditionBlock(rules[n], ret)
		if err != nil {
			return nil, fmt.Errorf("seccomp: %s: %w", n, err)
		}
		if err := add(n, block); err != nil {
			return nil, err
		}
	}
	if _, ok := info.SyscallNames["clone3"]; ok {
		if err := add("clone3", []bpf.Instruction{bpf.RetConstant{Val: retENOSYS}}); err != nil {
			return nil, err
		}
	}
	nrs := make([]uint32, 0, len(blocks))
	for nr := range blocks {
		nrs = append(nrs, nr)
	}
	slices.Sort(nrs)

	// A foreign ABI (i386 on x86-64) gets the denied action: go-seccomp-bpf lets it
	// through to allow; libseccomp, which swtpm uses, kills it.
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: offArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(info.ID), SkipTrue: 1},
		bpf.RetConstant{Val: ret},
		bpf.LoadAbsolute{Off: offNR, Size: 4},
	}
	if info.ID == arch.X86_64.ID {
		prog = append(prog,
			bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: x32Bit, SkipFalse: 1},
			bpf.RetConstant{Val: retENOSYS})
	}
	return append(prog, search(nrs, blocks, bpf.RetConstant{Val: ret})...), nil
}

// leafSize is how many call numbers a leaf of the search compares one by one.
const leafSize = 8

// search returns the program that runs blocks[nr] for the call number in the
// accumulator if it is one of nrs (sorted), and allows the call otherwise. Each block
// ends in a return. Inner nodes split on the middle number (JGE, then an
// unconditional jump to the upper half, whose offset has 32 bits); a leaf compares
// each of its numbers in turn, a block right after its compare, or, for a block that
// only denies (deny), a jump to the leaf's one deny at its end.
func search(nrs []uint32, blocks map[uint32][]bpf.Instruction, deny bpf.Instruction) []bpf.Instruction {
	if len(nrs) <= leafSize {
		var out []bpf.Instruction
		var toDeny []int
		for _, nr := range nrs {
			b := blocks[nr]
			if len(b) == 1 && b[0] == deny {
				toDeny = append(toDeny, len(out))
				out = append(out, bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr})
				continue
			}
			out = append(out, bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr, SkipFalse: uint8(len(b))})
			out = append(out, b...)
		}
		out = append(out, bpf.RetConstant{Val: retAllow})
		if len(toDeny) > 0 {
			out = append(out, deny)
			for _, i := range toDeny {
				j := out[i].(bpf.JumpIf)
				j.SkipTrue = uint8(len(out) - i - 2)
				out[i] = j
			}
		}
		return out
	}
	mid := len(nrs) / 2
	lo, hi := search(nrs[:mid], blocks, deny), search(nrs[mid:], blocks, deny)
	out := []bpf.Instruction{
		bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: nrs[mid], SkipFalse: 1},
		bpf.Jump{Skip: uint32(len(lo))},
	}
	out = append(out, lo...)
	return append(out, hi...)
}

// conditionBlock returns the program that denies (returns ret) when all conditions of
// one of rules hold, and allows otherwise, for the call whose number was matched.
// The accumulator is reloaded for each argument, so nothing of it leaks into the next
// rule. Only the operations the policy uses are known.
func conditionBlock(rules []libseccomp.ArgumentConditions, ret uint32) ([]bpf.Instruction, error) {
	var out []bpf.Instruction
	for _, conds := range rules {
		// Jumps in this rule's code skip to the next rule (the condition fails);
		// their offsets are patched once the rule's length is known.
		var rule []bpf.Instruction
		var toNext []int
		for _, c := range conds {
			if c.Argument >= 6 {
				return nil, fmt.Errorf("argument %d: a call has 6", c.Argument)
			}
			hi, lo := uint32(c.Value>>32), uint32(c.Value)
			switch c.Operation {
			case libseccomp.NotEqual:
				// Holds if the high or the low halves differ.
				rule = append(rule,
					bpf.LoadAbsolute{Off: argHi(c.Argument), Size: 4},
					bpf.JumpIf{Cond: bpf.JumpEqual, Val: hi, SkipFalse: 2},
					bpf.LoadAbsolute{Off: argLo(c.Argument), Size: 4},
					bpf.JumpIf{Cond: bpf.JumpEqual, Val: lo})
				toNext = append(toNext, len(rule)-1)
			case libseccomp.BitsNotSet:
				// Holds if no bit of the value is set in either half.
				rule = append(rule,
					bpf.LoadAbsolute{Off: argHi(c.Argument), Size: 4},
					bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: hi})
				toNext = append(toNext, len(rule)-1)
				rule = append(rule,
					bpf.LoadAbsolute{Off: argLo(c.Argument), Size: 4},
					bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: lo})
				toNext = append(toNext, len(rule)-1)
			default:
				return nil, fmt.Errorf("condition %s: not supported by the filter builder", c.Operation)
			}
		}
		rule = append(rule, bpf.RetConstant{Val: ret})
		for _, i := range toNext {
			j := rule[i].(bpf.JumpIf)
			skip := len(rule) - i - 1
			if skip > 255 {
				return nil, fmt.Errorf("rule of %d instructions: too long for a conditional jump", len(rule))
			}
			j.SkipTrue = uint8(skip)
			rule[i] = j
		}
		out = append(out, rule...)
	}
	return append(out, bpf.RetConstant{Val: retAllow}), nil
}

// Offsets in struct seccomp_data.
const (
	offNR   = 0
	offArgs = 16
)

// argLo and argHi are the offsets of the low and high 32 bits of argument i.
func argLo(i uint32) uint32 { return offArgs + 8*i + 4*bigEndian() }
func argHi(i uint32) uint32 { return offArgs + 8*i + 4*(1-bigEndian()) }

// bigEndian is 1 on a big-endian machine: the filter is built for the one it runs
// on (or, generated, for amd64 on amd64).
func bigEndian() uint32 {
	x := uint16(1)
	if *(*byte)(unsafe.Pointer(&x)) == 0 {
		return 1
	}
	return 0
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
