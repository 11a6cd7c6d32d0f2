package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// parseCPUList parses "1" or "0,1" into a CPU set.
func parseCPUList(s string) (unix.CPUSet, error) {
	var set unix.CPUSet
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 || n >= 1024 {
			return set, fmt.Errorf("-cpus %q: want CPU numbers separated by commas, like 1 or 0,1", s)
		}
		set.Set(n)
	}
	return set, nil
}

// pinProcess restricts every thread of this process to set. Threads and
// child processes created afterwards inherit the mask, so the backends run
// on the same CPUs as the client and meet the same contention.
func pinProcess(set unix.CPUSet) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return fmt.Errorf("pinning to CPUs: %w", err)
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
			return fmt.Errorf("pinning thread %d to CPUs: %w", tid, err)
		}
	}
	return nil
}
