package nodump

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestMain re-executes this test binary as a child that applies nodump and waits, so the
// test can look at it from outside as another process would.
func TestMain(m *testing.M) {
	if os.Getenv("NKP_NODUMP_CHILD") == "1" {
		if err := Apply(); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		d, err := Dumpable()
		fmt.Println("applied", d, err)
		bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestApply: the child reports itself non-dumpable, and its /proc/PID/limits shows a
// core-file limit of 0 (soft and hard).
func TestApply(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NKP_NODUMP_CHILD=1")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); cmd.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "applied 0 <nil>" {
		t.Fatalf("child: %q, %v", line, err)
	}
	if soft, hard := coreLimit(t, cmd.Process.Pid); soft != "0" || hard != "0" {
		t.Errorf("core file size limit %s/%s, want 0/0", soft, hard)
	}
	// This process is untouched (Apply acts on its caller only).
	if d, _ := Dumpable(); d != 1 {
		t.Errorf("the test process became non-dumpable: %d", d)
	}
	var rl unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_CORE, &rl)
	t.Logf("test process RLIMIT_CORE %d/%d", rl.Cur, rl.Max)
}

// coreLimit returns the soft and hard "Max core file size" of /proc/PID/limits.
func coreLimit(t *testing.T, pid int) (soft, hard string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(strings.TrimPrefix(l, "Max core file size")); strings.HasPrefix(l, "Max core file size") && len(f) >= 2 {
			return f[0], f[1]
		}
	}
	t.Fatalf("no core file size in /proc/%d/limits", pid)
	return "", ""
}
