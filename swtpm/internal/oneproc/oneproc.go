// Package oneproc makes the Go runtime of nkp-swtpm start with one P (GOMAXPROCS=1)
// without changing the CPUs the process may run on. Only cmd/nkp-swtpm imports it, for
// its side effect.
//
// Each P costs about 17 KB of memory that the runtime touches at start, and the runtime
// sizes itself from the CPU affinity before any Go code runs: on a 64-CPU host every
// idle vTPM would carry 63 P that it never uses, since its data channel is served by
// libtpms' C loop and the Go side answers only the rare control requests and state
// writes. Setting GOMAXPROCS=1 from Go (runtime.GOMAXPROCS) is too late, and the
// environment of a vTPM is libvirt's, not ours.
//
// So an ELF constructor, which the dynamic loader runs before the Go runtime starts,
// narrows the process' CPU affinity to the CPU it runs on; the runtime then sees one
// CPU. This package's init gives every thread the original affinity back (threads
// inherit their creator's, so it repeats until no new thread appears), and the binary
// keeps GOMAXPROCS at 1 with //go:debug updatemaxprocs=0. When GOMAXPROCS is set in
// the environment, or the process may run on one CPU only, nothing is changed.
//
// A second constructor limits glibc's malloc to one arena (mallopt M_ARENA_MAX 1).
// glibc gives each thread that calls malloc an arena of its own, and every Go thread
// of a cgo program does (its start allocates), so an idle nkp-swtpm kept four or five
// arenas of which one page or more each is touched: about 12 KiB of its memory
// (8 idle instances, pinned: 2194 -> 2181 KiB PSS, within the noise of `go run
// ./test/bench/swtpmbench -cpus 1 -idle 8 -runs 3`; BENCHMARKS.md). The C code that allocates for
// real, libtpms and OpenSSL, runs under the engine's lock one thread at a time, so
// the one arena's lock is not contended. GLIBC_TUNABLES=glibc.malloc.arena_max=N in
// the environment still wins.
package oneproc

import (
	"fmt"
	"os"
	"strconv"
)

func init() {
	if !narrowed() {
		return
	}
	if err := restoreAll(); err != nil {
		// The process would stay on one CPU: say so, but do not refuse to run.
		fmt.Fprintf(os.Stderr, "nkp-swtpm: giving the threads their CPU affinity back failed (they run on one CPU): %v\n", err)
	}
}

// restoreAll gives every thread of the process the original affinity.
func restoreAll() error {
	done := map[int]bool{}
	for range 100 {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		fresh := false
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			if err := restore(tid); err != nil {
				return fmt.Errorf("thread %d: %w", tid, err)
			}
			done[tid], fresh = true, true
		}
		if !fresh {
			return nil
		}
	}
	return fmt.Errorf("threads kept appearing in /proc/self/task")
}
