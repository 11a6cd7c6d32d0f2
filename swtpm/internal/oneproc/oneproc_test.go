//go:debug updatemaxprocs=0

package oneproc

import (
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// cpusAllowed returns the Cpus_allowed_list of a /proc status file.
func cpusAllowed(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("%s: no Cpus_allowed_list", path)
	return ""
}

// The test binary links the package like nkp-swtpm: it runs with one P, and every
// thread may run on the CPUs its parent (go test) may run on.
func TestOneProcSameCPUs(t *testing.T) {
	parent := cpusAllowed(t, "/proc/"+itoa(os.Getppid())+"/status")
	if os.Getenv("GOMAXPROCS") != "" || !narrowed() {
		t.Skipf("not narrowed (GOMAXPROCS=%q, parent's CPUs %s): the runtime sized itself as usual", os.Getenv("GOMAXPROCS"), parent)
	}
	if n := runtime.GOMAXPROCS(0); n != 1 {
		t.Fatalf("GOMAXPROCS = %d, want 1 from the start", n)
	}
	tasks, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil || len(tasks) == 0 {
		t.Fatalf("no threads: %v", err)
	}
	for _, p := range tasks {
		if got := cpusAllowed(t, p); got != parent {
			t.Errorf("%s may run on CPUs %s, want the parent's %s", p, got, parent)
		}
	}
}

// The test binary links the constructor too: threads that each malloc share glibc's
// one arena instead of making one each.
func TestOneMallocArena(t *testing.T) {
	if os.Getenv("GLIBC_TUNABLES") != "" {
		t.Skipf("GLIBC_TUNABLES=%q may set arena_max", os.Getenv("GLIBC_TUNABLES"))
	}
	if mallocArenas() < 0 {
		t.Skip("no cgo or no malloc_info")
	}
	var wg, allocated sync.WaitGroup
	release := make(chan struct{})
	counts := make([]int, 4)
	for i := range counts {
		wg.Add(1)
		allocated.Add(1)
		go func() {
			defer wg.Done()
			// Each goroutine keeps its OS thread until all have malloc'd, so that four
			// threads allocate, not one thread four times.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			counts[i] = mallocArenas()
			allocated.Done()
			<-release
		}()
	}
	allocated.Wait()
	close(release)
	wg.Wait()
	for i, n := range counts {
		if n != 1 {
			t.Errorf("thread %d: glibc has %d malloc arenas, want 1 (M_ARENA_MAX set by the constructor)", i, n)
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
