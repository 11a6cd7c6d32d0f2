package seccomp

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/seccomp/internal/policy"
	"github.com/nkp-dev/nkp/test/e2e"
)

// childEnv marks a re-executed test binary that installs a filter and runs a probe:
// its value is "ACTION PROBE".
const childEnv = "NKP_SECCOMP_TEST_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		os.Exit(child(v))
	}
	os.Exit(m.Run())
}

func TestParseAction(t *testing.T) {
	tests := []struct {
		in      string
		want    Action
		wantErr bool
	}{
		{"kill", Kill, false},
		{"log", Log, false},
		{"none", None, false},
		{"", 0, true},
		{"KILL", 0, true},
		{"trap", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseAction(tt.in)
		if (err != nil) != tt.wantErr || (err == nil && got != tt.want) {
			t.Errorf("ParseAction(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
		if err == nil && got.String() != tt.in {
			t.Errorf("ParseAction(%q).String() = %q", tt.in, got.String())
		}
	}
}

// Return values of the filter (SECCOMP_RET_*).
const (
	retAllow  = 0x7fff0000
	retLog    = 0x7ffc0000
	retKill   = 0x80000000
	retENOSYS = 0x00050000 | uint32(unix.ENOSYS)
)

// seccompData lays out struct seccomp_data for x/net/bpf's VM, which loads words
// big-endian: each 32-bit word the kernel would load natively is stored big-endian.
func seccompData(nr, archID uint32, args ...uint64) []byte {
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b[0:], nr)
	binary.BigEndian.PutUint32(b[4:], archID)
	for i, a := range args {
		lo, hi := uint32(a), uint32(a>>32)
		if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 { // big-endian machine
			lo, hi = hi, lo
		}
		binary.BigEndian.PutUint32(b[16+8*i:], lo)
		binary.BigEndian.PutUint32(b[16+8*i+4:], hi)
	}
	return b
}

// The table installed on amd64 is what package internal/policy builds: regenerate
// it with `go generate ./swtpm/seccomp` after changing the policy.
func TestGeneratedFilterUpToDate(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skipf("the generated table is for amd64; %s builds its filter at start", runtime.GOARCH)
	}
	want, err := policy.Source()
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("zfilter_amd64.go")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("zfilter_amd64.go differs from what internal/policy builds: run `go generate ./swtpm/seccomp`")
	}
	// The pid goes where the placeholder was, and nowhere else.
	const pid = 4242
	for _, a := range []Action{Kill, Log} {
		prog, err := instructions(a, pid)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, in := range prog {
			if in.K == policy.PIDPlaceholder {
				t.Fatalf("%v: the pid placeholder is left in %+v", a, in)
			}
			if in.K == pid {
				n++
			}
		}
		if n != 4 { // kill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo
			t.Fatalf("%v: %d instructions compare with the pid, want 4", a, n)
		}
	}
}

// TestPolicyDecisions runs the installed filter in a BPF interpreter over system calls
// a vTPM makes, and ones it must never make.
func TestPolicyDecisions(t *testing.T) {
	info, err := arch.GetInfo("")
	if err != nil {
		t.Skipf("go-seccomp-bpf has no syscall table for %s: %v", runtime.GOARCH, err)
	}
	const pid = 4242
	goThread := uint64(unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
		unix.CLONE_SYSVSEM | unix.CLONE_THREAD)
	const (
		deny   = "deny"
		allow  = "allow"
		enosys = "enosys"
	)
	tests := []struct {
		name    string
		syscall string // name in the native table, or "#N" for a raw number
		archID  uint32 // 0: native
		args    []uint64
		want    string
	}{
		// The denylist, a sample from each group.
		{"execve", "execve", 0, nil, deny},
		{"execveat", "execveat", 0, nil, deny},
		{"fork", "fork", 0, nil, deny},
		{"vfork", "vfork", 0, nil, deny},
		{"ptrace", "ptrace", 0, nil, deny},
		{"mount", "mount", 0, nil, deny},
		{"fsopen", "fsopen", 0, nil, deny},
		{"init_module", "init_module", 0, nil, deny},
		{"finit_module", "finit_module", 0, nil, deny},
		{"reboot", "reboot", 0, nil, deny},
		{"kexec_load", "kexec_load", 0, nil, deny},
		{"bpf", "bpf", 0, nil, deny},
		{"keyctl", "keyctl", 0, nil, deny},
		{"clock_settime", "clock_settime", 0, nil, deny},
		{"settimeofday", "settimeofday", 0, nil, deny},
		{"swapon", "swapon", 0, nil, deny},
		{"chroot", "chroot", 0, nil, deny},
		{"pivot_root", "pivot_root", 0, nil, deny},
		{"personality", "personality", 0, nil, deny},
		{"userfaultfd", "userfaultfd", 0, nil, deny},
		{"perf_event_open", "perf_event_open", 0, nil, deny},
		{"io_uring_setup", "io_uring_setup", 0, nil, deny},
		{"unshare", "unshare", 0, nil, deny},
		{"setuid", "setuid", 0, nil, deny},
		{"setsid", "setsid", 0, nil, deny},
		{"process_vm_readv", "process_vm_readv", 0, nil, deny},
		{"setxattr", "setxattr", 0, nil, deny},
		{"shmget", "shmget", 0, nil, deny},
		{"seccomp itself", "seccomp", 0, nil, deny},
		// Narrowed calls.
		{"clone of a process (fork)", "clone", 0, []uint64{uint64(unix.SIGCHLD)}, deny},
		{"clone of a process (vfork)", "clone", 0, []uint64{unix.CLONE_VM | unix.CLONE_VFORK | uint64(unix.SIGCHLD)}, deny},
		{"clone of a thread", "clone", 0, []uint64{goThread}, allow},
		{"clone3 fails with ENOSYS", "clone3", 0, nil, enosys},
		{"tgkill own process", "tgkill", 0, []uint64{pid, pid + 1, uint64(unix.SIGURG)}, allow},
		{"tgkill other process", "tgkill", 0, []uint64{pid + 1, pid + 1, uint64(unix.SIGKILL)}, deny},
		{"kill own process", "kill", 0, []uint64{pid, uint64(unix.SIGUSR1)}, allow},
		{"kill other process", "kill", 0, []uint64{pid + 1, uint64(unix.SIGTERM)}, deny},
		{"kill own process group (0)", "kill", 0, []uint64{0, uint64(unix.SIGTERM)}, deny},
		{"kill every process (-1)", "kill", 0, []uint64{^uint64(0), uint64(unix.SIGTERM)}, deny},
		{"kill a process group (-pid)", "kill", 0, []uint64{^uint64(pid - 1), uint64(unix.SIGTERM)}, deny},
		{"kill own pid in the low half only", "kill", 0, []uint64{1<<32 | pid, uint64(unix.SIGTERM)}, deny},
		{"tkill any thread", "tkill", 0, []uint64{pid, uint64(unix.SIGURG)}, deny},
		{"pidfd_send_signal", "pidfd_send_signal", 0, []uint64{3, uint64(unix.SIGKILL), 0, 0}, deny},
		{"rt_sigqueueinfo own", "rt_sigqueueinfo", 0, []uint64{pid, uint64(unix.SIGUSR1), 0}, allow},
		{"rt_sigqueueinfo other", "rt_sigqueueinfo", 0, []uint64{pid + 1, uint64(unix.SIGUSR1), 0}, deny},
		{"rt_tgsigqueueinfo own", "rt_tgsigqueueinfo", 0, []uint64{pid, pid, uint64(unix.SIGUSR1), 0}, allow},
		{"rt_tgsigqueueinfo other", "rt_tgsigqueueinfo", 0, []uint64{pid + 1, pid + 1, uint64(unix.SIGUSR1), 0}, deny},
		{"prctl PR_SET_VMA", "prctl", 0, []uint64{policy.PRSetVMA, 0}, allow},
		{"prctl PR_SET_DUMPABLE", "prctl", 0, []uint64{unix.PR_SET_DUMPABLE, 1}, deny},
		{"prctl PR_SET_NO_NEW_PRIVS", "prctl", 0, []uint64{unix.PR_SET_NO_NEW_PRIVS, 1}, deny},
		{"prlimit64 read own", "prlimit64", 0, []uint64{0, unix.RLIMIT_NOFILE, 0, 0x1000}, allow},
		{"prlimit64 set own", "prlimit64", 0, []uint64{0, unix.RLIMIT_NOFILE, 0x1000, 0}, deny},
		{"prlimit64 read other", "prlimit64", 0, []uint64{pid + 1, unix.RLIMIT_NOFILE, 0, 0x1000}, deny},
		// What a vTPM, the Go runtime and libtpms need.
		{"read", "read", 0, nil, allow},
		{"write", "write", 0, nil, allow},
		{"openat", "openat", 0, nil, allow},
		{"fdatasync", "fdatasync", 0, nil, allow},
		{"fsync", "fsync", 0, nil, allow},
		{"pwrite64", "pwrite64", 0, nil, allow},
		{"rename", "rename", 0, nil, allow},
		{"renameat", "renameat", 0, nil, allow},
		{"unlinkat", "unlinkat", 0, nil, allow},
		{"flock", "flock", 0, nil, allow},
		{"recvmsg", "recvmsg", 0, nil, allow},
		{"sendmsg", "sendmsg", 0, nil, allow},
		{"accept4", "accept4", 0, nil, allow},
		{"epoll_pwait", "epoll_pwait", 0, nil, allow},
		{"futex", "futex", 0, nil, allow},
		{"mmap", "mmap", 0, nil, allow},
		{"madvise", "madvise", 0, nil, allow},
		{"rt_sigaction", "rt_sigaction", 0, nil, allow},
		{"rt_sigreturn", "rt_sigreturn", 0, nil, allow},
		{"sigaltstack", "sigaltstack", 0, nil, allow},
		{"getrandom", "getrandom", 0, nil, allow},
		{"exit_group", "exit_group", 0, nil, allow},
		// Other ABIs.
		{"i386 execve", "#11", 0x40000003, nil, deny},
		{"i386 getpid", "#20", 0x40000003, nil, deny},
		{"x32 read", "#1073741824", 0, nil, enosys},
	}
	for _, a := range []Action{Kill, Log} {
		prog, err := instructions(a, pid)
		if err != nil {
			t.Fatalf("instructions(%v): %v", a, err)
		}
		insts := make([]bpf.Instruction, len(prog))
		for i, in := range prog {
			insts[i] = bpf.RawInstruction{Op: in.Code, Jt: in.Jt, Jf: in.Jf, K: in.K}.Disassemble()
		}
		if len(insts) > unix.BPF_MAXINSNS {
			t.Fatalf("policy(%v): %d instructions, over the kernel's %d", a, len(insts), unix.BPF_MAXINSNS)
		}
		vm, err := bpf.NewVM(insts)
		if err != nil {
			t.Fatalf("policy(%v): not a valid BPF program: %v", a, err)
		}
		denied := uint32(retKill)
		if a == Log {
			denied = retLog
		}
		want := map[string]uint32{deny: denied, allow: retAllow, enosys: retENOSYS}
		for _, tt := range tests {
			var nr uint32
			if n, ok := strings.CutPrefix(tt.syscall, "#"); ok {
				fmt.Sscan(n, &nr)
			} else {
				num, ok := info.SyscallNames[tt.syscall]
				if !ok {
					continue // not on this architecture
				}
				nr = uint32(num)
			}
			archID := uint32(info.ID)
			if tt.archID != 0 {
				if info.ID != 0xc000003e { // the i386 and x32 rows are about x86-64
					continue
				}
				archID = tt.archID
			}
			got, err := vm.Run(seccompData(nr, archID, tt.args...))
			if err != nil {
				t.Fatalf("%v/%s: run: %v", a, tt.name, err)
			}
			if uint32(got) != want[tt.want] {
				t.Errorf("%v/%s: filter returns %#x, want %s (%#x)", a, tt.name, uint32(got), tt.want, want[tt.want])
			}
		}
	}
}

func TestPolicyNone(t *testing.T) {
	if _, err := instructions(None, 1); err == nil {
		t.Fatal("instructions(None) built a filter; None must install nothing")
	}
	f, err := New(None)
	if err != nil || f.Action() != None {
		t.Fatalf("New(None) = %v, %v; want a None filter", f, err)
	}
	if err := f.Install(); err != nil {
		t.Fatalf("New(None).Install() = %v, want nil", err)
	}
	if err := Install(None); err != nil {
		t.Fatalf("Install(None) = %v, want nil", err)
	}
	if got := statusField(t, "/proc/self/status", "Seccomp"); got != "0" {
		t.Fatalf("after Install(None) Seccomp is %q, want 0 (no filter)", got)
	}
}

// TestProgramNeedsKernelActions: a kernel lacking seccomp or the action is an error
// naming the way out, for Kill and Log alike, never a silent pass.
func TestProgramNeedsKernelActions(t *testing.T) {
	tests := []struct {
		name    string
		action  Action
		avail   string // contents of actions_avail; "-" for a missing file
		wantErr string
	}{
		{"no seccomp, kill", Kill, "-", "no seccomp filters"},
		{"no seccomp, log", Log, "-", "no seccomp filters"},
		{"no kill_process", Kill, "kill_thread trap errno log allow", `"kill_process"`},
		{"no log", Log, "kill_process kill_thread trap errno allow", `"log"`},
		{"no errno", Kill, "kill_process log allow", `"errno"`},
		{"kill", Kill, "kill_process errno log allow", ""},
		{"log", Log, "kill_process errno log allow", ""},
	}
	for _, tt := range tests {
		read := func(string) ([]byte, error) {
			if tt.avail == "-" {
				return nil, os.ErrNotExist
			}
			return []byte(tt.avail + "\n"), nil
		}
		prog, err := program(tt.action, read)
		if tt.wantErr == "" {
			if err != nil || prog == nil || prog.Len == 0 {
				t.Errorf("%s: program = %v, %v; want a filter", tt.name, prog, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "--seccomp action=none") {
			t.Errorf("%s: error %v; want one naming %s and --seccomp action=none", tt.name, err, tt.wantErr)
		}
	}
}

func TestActionsAvail(t *testing.T) {
	missing := func(string) ([]byte, error) { return nil, os.ErrNotExist }
	if _, err := actionsAvail(missing); err == nil || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "action=none") {
		t.Fatalf("actionsAvail without the proc file = %v; want an error wrapping ErrNotExist that names --seccomp action=none", err)
	}
	got, err := actionsAvail(func(string) ([]byte, error) { return []byte("kill_process errno log allow\n"), nil })
	if err != nil || !got["log"] || !got["kill_process"] || got["trap"] {
		t.Fatalf("actionsAvail = %v, %v", got, err)
	}
}

// TestInstall installs the filter in a re-executed test binary and runs one probe
// there: a denied call kills the child with SIGSYS under Kill, and is allowed under
// Log and None; what a vTPM does keeps working under every action.
func TestInstall(t *testing.T) {
	if !supported() {
		e2e.Unavailable(t, "this kernel has no seccomp filters with the kill_process, log and errno actions (/proc/sys/kernel/seccomp/actions_avail)")
	}
	tests := []struct {
		action Action
		probe  string
		killed bool
	}{
		{Kill, "getpriority", true},
		{Kill, "exec", true},
		{Kill, "tgkill-parent", true},
		{Kill, "kill-parent", true},
		{Kill, "kill-group", true},
		{Kill, "tkill-parent", true},
		{Kill, "pidfd-signal-parent", true},
		{Kill, "prctl", true},
		{Kill, "runtime", false},
		{Log, "getpriority", false},
		{Log, "exec", false},
		{Log, "tgkill-parent", false},
		{Log, "kill-parent", false},
		{Log, "tkill-parent", false},
		{Log, "pidfd-signal-parent", false},
		{Log, "prctl", false},
		{Log, "runtime", false},
		{None, "getpriority", false},
		{None, "exec", false},
		{None, "tgkill-parent", false},
		{None, "kill-parent", false},
		{None, "prctl", false},
		{None, "runtime", false},
	}
	for _, tt := range tests {
		t.Run(tt.action.String()+"/"+tt.probe, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), childEnv+"="+tt.action.String()+" "+tt.probe)
			cmd.Dir = t.TempDir()
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			err := cmd.Run()
			var ee *exec.ExitError
			if err != nil && !errors.As(err, &ee) {
				t.Fatalf("run the child: %v", err)
			}
			ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
			installed := strings.Contains(out.String(), "installed\n")
			survived := strings.Contains(out.String(), "survived\n")
			if !installed {
				t.Fatalf("the child did not install the filter: %v\n%s", err, out.String())
			}
			if tt.killed {
				if !ws.Signaled() || ws.Signal() != syscall.SIGSYS || survived {
					t.Fatalf("child: %v, want killed by SIGSYS before it reports survival\n%s", err, out.String())
				}
				return
			}
			if err != nil || !survived {
				t.Fatalf("child: %v, want exit 0 after the probe\n%s", err, out.String())
			}
		})
	}
}

// supported reports whether the kernel offers seccomp filters with the actions the
// tests use.
func supported() bool {
	avail, err := actionsAvail(os.ReadFile)
	return err == nil && avail["kill_process"] && avail["log"] && avail["errno"]
}

// child installs the filter spec names ("ACTION PROBE"), runs the probe and returns
// the exit code. It prints "installed" once the filter is in and "survived" after the
// probe.
func child(spec string) int {
	name, probe, _ := strings.Cut(spec, " ")
	a, err := ParseAction(name)
	if err != nil {
		fmt.Println(err)
		return 2
	}
	// Threads made before the filter: TSYNC must give it to each of them.
	startThreads(4)
	if err := Install(a); err != nil {
		fmt.Println("install:", err)
		return 2
	}
	fmt.Println("installed")
	if err := runProbe(a, probe); err != nil {
		fmt.Printf("probe %s: %v\n", probe, err)
		return 1
	}
	fmt.Println("survived")
	return 0
}

// startThreads makes the Go runtime run at least n more OS threads and keeps them.
func startThreads(n int) {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread stays parked with its goroutine
			wg.Done()
			select {}
		}()
	}
	wg.Wait()
}

func runProbe(a Action, probe string) error {
	switch probe {
	case "getpriority":
		_, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
		return err
	case "exec":
		return exec.Command("/bin/true").Run()
	case "tgkill-parent":
		ppid := os.Getppid()
		return unix.Tgkill(ppid, ppid, 0)
	case "kill-parent": // signal 0 only checks the permission
		return unix.Kill(os.Getppid(), 0)
	case "kill-group":
		return unix.Kill(0, 0)
	case "tkill-parent":
		_, _, errno := unix.Syscall(unix.SYS_TKILL, uintptr(os.Getppid()), 0, 0)
		if errno != 0 {
			return errno
		}
		return nil
	case "pidfd-signal-parent":
		// The pidfd is opened before the filter would matter (pidfd_open is allowed);
		// sending on it is what must be denied.
		fd, err := unix.PidfdOpen(os.Getppid(), 0)
		if err != nil {
			return fmt.Errorf("pidfd_open: %w", err)
		}
		defer unix.Close(fd)
		return unix.PidfdSendSignal(fd, 0, nil, 0)
	case "prctl":
		_, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
		return err
	case "runtime":
		return runtimeProbe(a)
	}
	return fmt.Errorf("unknown probe %q", probe)
}

// runtimeProbe does what nkp-swtpm does after the filter is in: new threads, garbage
// collection over a grown heap, a state file written, synced and renamed, an fd passed
// with SCM_RIGHTS, a signal delivered to itself. Then it checks that every thread has
// the filter (or none, for None) and no_new_privs.
func runtimeProbe(a Action) error {
	startThreads(8)
	heap := make([][]byte, 0, 64)
	for range 64 {
		heap = append(heap, make([]byte, 1<<20))
	}
	runtime.GC()
	runtime.KeepAlive(heap)

	dir, err := os.Getwd()
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, "state.tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt([]byte("permall"), 0); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("fdatasync: %w", err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, "state")); err != nil {
		return err
	}

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if err := unix.Sendmsg(fds[0], []byte{1}, unix.UnixRights(int(os.Stdout.Fd())), nil, 0); err != nil {
		return fmt.Errorf("sendmsg SCM_RIGHTS: %w", err)
	}
	buf, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(fds[1], buf, oob, 0)
	if err != nil {
		return fmt.Errorf("recvmsg SCM_RIGHTS: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return fmt.Errorf("no fd received: %v", err)
	}
	got, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(got) != 1 {
		return fmt.Errorf("no fd received: %v", err)
	}
	unix.Close(got[0])

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	if err := syscall.Kill(os.Getpid(), syscall.SIGUSR1); err != nil {
		return err
	}
	select {
	case <-sig:
	case <-time.After(10 * time.Second):
		return errors.New("SIGUSR1 sent to itself never arrived")
	}

	want := "2"
	if a == None {
		want = "0"
	}
	tasks, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil || len(tasks) < 9 {
		return fmt.Errorf("%d threads in /proc/self/task, want more than 8 (%v)", len(tasks), err)
	}
	for _, p := range tasks {
		fields, err := readStatus(p)
		if err != nil {
			return err
		}
		if fields["Seccomp"] != want {
			return fmt.Errorf("%s: Seccomp %q, want %s", p, fields["Seccomp"], want)
		}
		if a != None && fields["NoNewPrivs"] != "1" {
			return fmt.Errorf("%s: NoNewPrivs %q, want 1", p, fields["NoNewPrivs"])
		}
	}
	return nil
}

// readStatus reads the "Key:\tvalue" lines of a /proc status file.
func readStatus(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	fields := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	return fields, sc.Err()
}

func statusField(t *testing.T, path, key string) string {
	t.Helper()
	fields, err := readStatus(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return fields[key]
}
