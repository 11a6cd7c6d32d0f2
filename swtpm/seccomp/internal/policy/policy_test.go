package policy

import (
	"encoding/binary"
	"testing"

	libseccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// linearProgram is the filter as go-seccomp-bpf assembles the same policy (one
// compare per call number in turn), with the same foreign-ABI check in front: the
// reference Build's binary search must decide as.
func linearProgram(info *arch.Info, ret, pid uint32) ([]bpf.Instruction, error) {
	names, narrowed := Rules(info, pid)
	p := libseccomp.Policy{
		DefaultAction: libseccomp.ActionAllow,
		Syscalls:      []libseccomp.SyscallGroup{{Names: names, NamesWithCondtions: narrowed, Action: libseccomp.Action(ret)}},
	}
	if _, ok := info.SyscallNames["clone3"]; ok {
		p.Syscalls = append(p.Syscalls, libseccomp.SyscallGroup{Names: []string{"clone3"}, Action: libseccomp.Action(retENOSYS)})
	}
	prog, err := p.Assemble()
	if err != nil {
		return nil, err
	}
	head := []bpf.Instruction{
		bpf.LoadAbsolute{Off: offArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(info.ID), SkipTrue: 1},
		bpf.RetConstant{Val: ret},
	}
	return append(head, prog...), nil
}

func linear(t *testing.T, info *arch.Info, ret, pid uint32) []bpf.Instruction {
	t.Helper()
	prog, err := linearProgram(info, ret, pid)
	if err != nil {
		t.Fatal(err)
	}
	return prog
}

// data is a struct seccomp_data as x/net/bpf's interpreter loads it (big-endian
// words, each 32-bit half of an argument where the kernel's native layout has it).
func data(nr, archID uint32, args [6]uint64) []byte {
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b[0:], nr)
	binary.BigEndian.PutUint32(b[4:], archID)
	for i, a := range args {
		binary.BigEndian.PutUint32(b[argLo(uint32(i)):], uint32(a))
		binary.BigEndian.PutUint32(b[argHi(uint32(i)):], uint32(a>>32))
	}
	return b
}

func vm(t *testing.T, insts []bpf.Instruction) *bpf.VM {
	t.Helper()
	if len(insts) > unix.BPF_MAXINSNS {
		t.Fatalf("%d instructions, over the kernel's %d", len(insts), unix.BPF_MAXINSNS)
	}
	v, err := bpf.NewVM(insts)
	if err != nil {
		t.Fatalf("not a valid BPF program: %v", err)
	}
	return v
}

// TestSameDecisionsAsLinear runs Build's program and go-seccomp-bpf's linear one for
// the same policy over every call number (native, x32 and a foreign ABI) with
// arguments around each value the policy compares, and wants the same return every
// time, for both actions.
func TestSameDecisionsAsLinear(t *testing.T) {
	info, err := arch.GetInfo("")
	if err != nil {
		t.Skipf("go-seccomp-bpf has no syscall table here: %v", err)
	}
	// A pid above every call number: the linear program compares an argument left in
	// its accumulator with later call numbers (see TestPidLikeCallNumber).
	const pid = 4242
	goThread := uint64(unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
		unix.CLONE_SYSVSEM | unix.CLONE_THREAD)
	values := []uint64{0, 1, pid, pid + 1, pid - 1, 1<<32 | pid, 1 << 32, ^uint64(0), ^uint64(pid - 1),
		uint64(unix.SIGCHLD), goThread, goThread | 1<<32, unix.CLONE_THREAD, 1<<32 | unix.CLONE_THREAD,
		PRSetVMA, 1<<32 | PRSetVMA, unix.PR_SET_DUMPABLE, unix.PR_SET_NO_NEW_PRIVS}
	var argSets [][6]uint64
	for _, a := range values {
		for _, c := range values {
			argSets = append(argSets, [6]uint64{a, 7, c, 0x1000})
		}
	}
	var nrs []uint32
	for nr := uint32(0); nr < 1024; nr++ {
		nrs = append(nrs, nr)
	}
	nrs = append(nrs, x32Bit, x32Bit+1, x32Bit+59, x32Bit+520, 0x7fffffff, 0xffffffff)
	archs := []uint32{uint32(info.ID), 0x40000003, 0}
	for _, ret := range []uint32{RetKillProcess, RetLog} {
		insts, err := Build(ret, pid)
		if err != nil {
			t.Fatal(err)
		}
		tree, lin := vm(t, insts), vm(t, linear(t, info, ret, pid))
		n := 0
		for _, a := range archs {
			for _, nr := range nrs {
				sets := argSets
				if a != uint32(info.ID) || nr > 600 {
					sets = argSets[:1]
				}
				for _, args := range sets {
					d := data(nr, a, args)
					got, err1 := tree.Run(d)
					want, err2 := lin.Run(d)
					if err1 != nil || err2 != nil {
						t.Fatalf("run: %v, %v", err1, err2)
					}
					if got != want {
						t.Fatalf("ret %#x, arch %#x, call %d, args %#x: Build's program returns %#x, go-seccomp-bpf's %#x", ret, a, nr, args, uint32(got), uint32(want))
					}
					n++
				}
			}
		}
		t.Logf("ret %#x: %d inputs decided alike; %d instructions (linear %d)", ret, n, len(insts), len(linear(t, info, ret, pid)))
	}
}

// TestPidLikeCallNumber: a process whose pid is the number of a narrowed call may
// still signal itself (go-seccomp-bpf's layout denied tgkill to pid 302 on amd64,
// comparing the pid left in its accumulator with prlimit64's number).
func TestPidLikeCallNumber(t *testing.T) {
	info, err := arch.GetInfo("")
	if err != nil {
		t.Skipf("go-seccomp-bpf has no syscall table here: %v", err)
	}
	for _, name := range []string{"kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64", "clone3", "prctl"} {
		nr, ok := info.SyscallNames[name]
		if !ok {
			continue
		}
		pid := uint32(nr)
		insts, err := Build(RetKillProcess, pid)
		if err != nil {
			t.Fatal(err)
		}
		v := vm(t, insts)
		for _, sig := range []string{"kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"} {
			got, err := v.Run(data(uint32(info.SyscallNames[sig]), uint32(info.ID), [6]uint64{uint64(pid), uint64(pid), uint64(unix.SIGURG)}))
			if err != nil {
				t.Fatal(err)
			}
			if uint32(got) != retAllow {
				t.Errorf("pid %d (%s's number): %s of its own pid returns %#x, want allow", pid, name, sig, uint32(got))
			}
		}
	}
}
