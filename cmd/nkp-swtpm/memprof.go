//go:build nkpmemprof

// Memory profiling hook for nkp-swtpm, only in a build with -tags nkpmemprof (make
// build never sets it, so a release binary reads no such variable): with
// NKP_SWTPM_MEMPROF=DIR, 3 s after the start the process writes a heap dump
// (runtime/debug.WriteHeapDump: every object and stack frame with its address) and
// its goroutines into DIR. Run it with GODEBUG=memprofilerate=1 so that the dump
// records every object's allocation site, and --seccomp action=none so that the
// files can be created; compare the addresses with /proc/PID/pagemap read before the
// dump to see what keeps each touched page of the Go heap arena (BENCHMARKS.md, vTPM
// memory).
package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"time"
)

func init() {
	dir := os.Getenv("NKP_SWTPM_MEMPROF")
	if dir == "" {
		return
	}
	go func() {
		time.Sleep(3 * time.Second)
		pid := os.Getpid()
		h, _ := os.Create(fmt.Sprintf("%s/%d.heapdump", dir, pid))
		debug.WriteHeapDump(h.Fd())
		h.Close()
		g, _ := os.Create(fmt.Sprintf("%s/%d.goroutines", dir, pid))
		pprof.Lookup("goroutine").WriteTo(g, 2)
		g.Close()
	}()
}
