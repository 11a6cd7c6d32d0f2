// Package schedslice asks the kernel's fair scheduler for short time slices for the
// threads of a process whose work is a short answer that someone waits for.
//
// Since Linux 6.12 the fair scheduler (EEVDF) takes a time slice per task
// (sched_setattr's sched_runtime, 0.1 to 100 ms; the default is 0.7 ms times 1 + log2 of
// the CPUs). A task with a shorter slice has an earlier virtual deadline, so when it
// wakes it preempts a CPU-bound task at once instead of waiting for the next tick
// (what it does for the hook: BENCHMARKS.md, Host, hookbench). It changes no CPU share and needs no privilege: a task with a
// short slice runs as often in total, in shorter pieces. Older kernels ignore the value,
// and so does this package's caller on any error: a slice is a hint, never a reason to
// fail.
//
// nkp's latency-bound processes ask for it: nkp-hostd, which answers every protected
// VM's hooks while libvirtd's worker waits (its nkp-swtpm processes inherit the slice
// across fork and exec, so their start-up, which the start hook waits for, is quick
// too), and nkp-hook when it asks nkp-hostd (cmd/nkp-hook's assembly entry makes the
// same two system calls).
//
// Importers: hostd/cli (nkp-hostd serve), hooks. Linux-only, as nkp is; no state.
package schedslice

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Short is the slice nkp asks for: the kernel's minimum.
const Short = 100 * time.Microsecond

// Set gives every thread of this process the time slice d, keeping each thread's
// policy and nice value; threads created later inherit it from the thread that creates
// them. Threads with a policy other than SCHED_OTHER or SCHED_BATCH are left alone. It
// returns the first error (the first thread's, when a seccomp filter refuses the call).
func Set(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("time slice %v: not a duration of 0 or more", d)
	}
	// A thread the runtime starts while the list is walked inherits from one that may not
	// be done yet: walk until a pass finds no new thread (two passes nearly always).
	done := map[int]bool{}
	for pass := 0; pass < 10; pass++ {
		tids, err := threads()
		if err != nil {
			return fmt.Errorf("time slice: %w", err)
		}
		fresh := 0
		for _, tid := range tids {
			if done[tid] {
				continue
			}
			fresh++
			if err := setThread(tid, d); err != nil {
				if errors.Is(err, unix.ESRCH) {
					continue // it ended
				}
				return fmt.Errorf("time slice of thread %d: %w", tid, err)
			}
			done[tid] = true
		}
		if fresh == 0 {
			return nil
		}
	}
	return nil
}

// Of returns the time slice of thread tid (0: this thread): the kernel's default unless
// one was set; 0 on a kernel older than 6.12.
func Of(tid int) (time.Duration, error) {
	a, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return 0, err
	}
	return time.Duration(a.Runtime), nil
}

func setThread(tid int, d time.Duration) error {
	a, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return err
	}
	if a.Policy != unix.SCHED_NORMAL && a.Policy != unix.SCHED_BATCH {
		return nil
	}
	a.Flags &= unix.SCHED_FLAG_RESET_ON_FORK // not the utilisation clamps sched_getattr reports
	a.Runtime = uint64(d)
	a.Deadline, a.Period = 0, 0
	return unix.SchedSetAttr(tid, a, 0)
}

func threads() ([]int, error) {
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil, err
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}
