//go:build linux

package policy

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// installChildEnv marks a re-executed test binary that installs one program ("search"
// or "linear") and prints how long the seccomp call took, in ns.
const installChildEnv = "NKP_SECCOMP_POLICY_INSTALL"

func TestMain(m *testing.M) {
	if v := os.Getenv(installChildEnv); v != "" {
		os.Exit(installChild(v))
	}
	os.Exit(m.Run())
}

func installChild(layout string) int {
	info, err := arch.GetInfo("")
	if err != nil {
		fmt.Println(err)
		return 2
	}
	pid := uint32(os.Getpid())
	var insts []bpf.Instruction
	if layout == "search" {
		insts, err = Build(RetLog, pid)
	} else {
		insts, err = linearProgram(info, RetLog, pid)
	}
	if err != nil {
		fmt.Println(err)
		return 2
	}
	raw, err := bpf.Assemble(insts)
	if err != nil {
		fmt.Println(err)
		return 2
	}
	f := make([]unix.SockFilter, len(raw))
	for i, in := range raw {
		f[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	prog := unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]}
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Println(err)
		return 2
	}
	start := time.Now()
	_, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&prog)))
	d := time.Since(start)
	if errno != 0 {
		fmt.Println(errno)
		return 2
	}
	fmt.Println(d.Nanoseconds())
	return 0
}

// BenchmarkInstall installs Build's program and go-seccomp-bpf's linear one for the
// same policy, each in a fresh child process (the kernel runs a new filter over every
// call number to cache the ones it always allows), and reports the seccomp call's
// median time as install-µs:
//
//	go test -run XXX -bench Install -benchtime 200x ./swtpm/seccomp/internal/policy
func BenchmarkInstall(b *testing.B) {
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	for _, layout := range []string{"search", "linear"} {
		b.Run(layout, func(b *testing.B) {
			var ns []int64
			for b.Loop() {
				cmd := exec.Command(exe, "-test.run=XXX")
				cmd.Env = append(os.Environ(), installChildEnv+"="+layout)
				out, err := cmd.CombinedOutput()
				if err != nil {
					b.Fatalf("%v: %s", err, out)
				}
				n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
				if err != nil {
					b.Fatalf("child said %q", out)
				}
				ns = append(ns, n)
			}
			slices.Sort(ns)
			b.ReportMetric(float64(ns[len(ns)/2])/1e3, "install-µs")
		})
	}
}
