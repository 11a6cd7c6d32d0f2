package schedslice

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sliceOfProc reads se.slice from /proc/PID/sched, as the kernel schedules it.
func sliceOfProc(t *testing.T, sched string) time.Duration {
	t.Helper()
	for _, l := range strings.Split(sched, "\n") {
		if name, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(name) == "se.slice" {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				t.Fatalf("se.slice %q: %v", v, err)
			}
			return time.Duration(n)
		}
	}
	t.Skip("no se.slice in /proc/PID/sched (a kernel before 6.12)")
	return 0
}

func TestSet(t *testing.T) {
	def, err := Of(0)
	if err != nil {
		t.Fatal(err)
	}
	if def == 0 {
		t.Skip("this kernel reports no time slice (before 6.12)")
	}
	if err := Set(Short); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Set(0) })
	tids, err := threads()
	if err != nil {
		t.Fatal(err)
	}
	for _, tid := range tids {
		if d, err := Of(tid); err == nil && d != Short {
			t.Errorf("thread %d: slice %v after Set(%v)", tid, d, Short)
		}
	}
	// A program started now inherits it, across fork and exec.
	out, err := exec.Command("cat", "/proc/self/sched").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := sliceOfProc(t, string(out)); got != Short {
		t.Errorf("child's se.slice %v, want %v", got, Short)
	}
	// 0 gives back the kernel's default.
	if err := Set(0); err != nil {
		t.Fatal(err)
	}
	if d, err := Of(0); err != nil || d == Short {
		t.Errorf("slice %v (%v) after Set(0), want the default", d, err)
	}
	raw, err := os.ReadFile("/proc/self/sched")
	if err != nil {
		t.Fatal(err)
	}
	if got := sliceOfProc(t, string(raw)); got == Short {
		t.Errorf("se.slice still %v after Set(0)", got)
	}
}

func TestSetRejectsNegative(t *testing.T) {
	err := Set(-time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "-1ms") {
		t.Fatalf("Set(-1ms) = %v, want an error naming the value", err)
	}
}
