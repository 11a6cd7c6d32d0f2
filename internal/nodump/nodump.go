// Package nodump keeps a process's memory, and so the keys in it, out of core dumps and
// out of reach of same-user debuggers: it sets RLIMIT_CORE to 0 (no core file, also for
// the Go runtime's GOTRACEBACK=crash) and PR_SET_DUMPABLE to 0 (no core dump through a
// core_pattern pipe either, no ptrace attach and no /proc/PID/mem, environ or fd by
// other processes of the same user; /proc/PID/stat and cmdline stay readable).
//
// The processes that hold keys call Apply first thing (cmd/nkp-swtpm through swtpm/cli,
// cmd/nkp-provider through provider/cli), not only their unit files (LimitCORE=0), so a
// start by hand, by libvirt or by a test is covered too. The kernel resets the dumpable
// flag when the process changes its user (setuid), so call Apply again after that.
//
// Importers: the mains' CLI packages of key-holding daemons (swtpm/cli, provider/cli).
// It has no state; it is Linux-only, as nkp is.
package nodump

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Apply sets RLIMIT_CORE (soft and hard) to 0 and marks the process non-dumpable. Both
// steps are tried; the error names each one that failed.
func Apply() error {
	var errs []error
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		errs = append(errs, fmt.Errorf("setrlimit(RLIMIT_CORE, 0): %w", err))
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		errs = append(errs, fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w", err))
	}
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return fmt.Errorf("keep keys out of core dumps: %w", errs[0])
	}
	return fmt.Errorf("keep keys out of core dumps: %w; %w", errs[0], errs[1])
}

// Dumpable reports the calling process's PR_GET_DUMPABLE value (0: not dumpable).
func Dumpable() (int, error) {
	v, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil {
		return 0, fmt.Errorf("prctl(PR_GET_DUMPABLE): %w", err)
	}
	return v, nil
}
