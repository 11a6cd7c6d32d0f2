// Package cli is the program nkp-swtpm: it takes the swtpm command line that QEMU
// users, libvirt 9.0, swtpm_setup, swtpm_ioctl and swtpm_bios use (`nkp-swtpm socket
// [options]`, parsed by package swtpm/cmdline; see cmdline.Usage and
// specs/swtpm-protocol.md §3) and turns it into a running vTPM server from package
// swtpm: logging, pid file, --runas, --daemon, the control and data sockets, the state
// directory with its key, and the seccomp filter (package swtpm/seccomp).
//
// Only cmd/nkp-swtpm imports it (it links libtpms through cgo). A program that only
// builds or checks an nkp-swtpm command line imports swtpm/cmdline instead.
//
// # Behaviour beyond parsing
//
//   - The serving process calls internal/nodump.Apply (RLIMIT_CORE 0,
//     PR_SET_DUMPABLE 0) first and again after --runas. --runas switches uid, gid and
//     groups before any file or socket is opened.
//   - Keys are read (state.ParseKey) in the process that serves (the daemon child
//     with -d) and wiped after Serve.
//   - -d: re-exec of /proc/self/exe with the same argv, Setsid, stdio on /dev/null,
//     every fd the options name passed under the same number (cmdline.InheritedFDs),
//     and a readiness pipe whose number is in NKP_SWTPM_READY_FD (not a secret). The
//     parent exits 0 once the child wrote READY, or 1 with the child's error, within
//     30 s. Ready (and the pid file written) means the sockets listen and, with
//     --flags not-need-init or startup-*, that the TPM started (state decrypted,
//     TPM2_Startup done), so a wrong key fails -d instead of leaving a daemon that
//     cannot serve.
//   - --pid file= and --log file= are opened with O_NOFOLLOW and must be regular files
//     (a planted symbolic link or FIFO is refused, nothing behind it is written). The
//     pid file is written in place (swtpm_setup 0.7.1 watches the inode it created)
//     and removed at exit. The log is created 0600 (append, or truncate); file=-
//     discards; level >= 2 adds debug lines; prefix= prefixes every line; without
//     --log, stderr.
//   - --tpmstate mode= becomes state.Options.Mode (given to existing files too);
//     without it Options.Mode is 0 (0640 for new files, existing files left alone).
//   - --seccomp action=kill|log|none (default kill, as swtpm): the filter is built
//     before the state and sockets are opened, so a kernel without seccomp fails the
//     start with a sentence naming action=none, and installed once the sockets listen
//     and the state is locked, before the first client byte is read (so before the
//     TPM starts at launch, the pid file is written and readiness is reported). Its
//     log line and the "nkp-swtpm serving" line are written after a control client
//     that was already waiting got its first answer, before the TPM starts.
//   - --migration incoming defers opening (and locking) the state directory to the
//     TPM's first state access (CMD_INIT) or LOCK_STORAGE, waiting up to 3 s for a
//     shared-storage source to release it.
//   - NKP_SWTPM_STATUS_FD=N (nkp's, not swtpm's; not carried across -d): fd N is an
//     inherited listening unix socket served as the status channel
//     (swtpm.Config.StatusListener), where nkp-hostd asks a running VM's vTPM for
//     GET_TPMESTABLISHED while QEMU holds the control channel.
//   - Idle trim (package swtpm, "Idle trim"): 2 to 4 s after the last control request
//     or TPM command the process drops its mappings of read-only file-backed
//     segments, losslessly. NKP_SWTPM_IDLE_TRIM (nkp's, optional) sets that idle time (a Go
//     duration, e.g. 10s) or turns it off (off); a bad value fails the start.
//   - --print-capabilities and --print-states print byte for byte in swtpm 0.7.1's
//     layout, checked against the real swtpm (TestPrintShapeAsSwtpm).
//   - TCP sockets: bindaddr= must be an IPv4 or IPv6 address (ifname= gives the zone
//     of a link-local one); a host name is refused, as swtpm 0.7.1's inet_pton
//     refuses it, and is never looked up (Go's DNS resolver is not linked in).
//   - A --ctrl is required to serve; chardev and cuse modes are refused.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/nkp-dev/nkp/internal/nodump"
	"github.com/nkp-dev/nkp/swtpm/cmdline"
	// One P from the first instruction, whatever the host's CPU count.
	_ "github.com/nkp-dev/nkp/swtpm/internal/oneproc"
	"github.com/nkp-dev/nkp/swtpm/internal/termsig"
	"github.com/nkp-dev/nkp/swtpm/seccomp"
)

// topUsage is printed for `nkp-swtpm` without a mode.
const topUsage = `Usage: nkp-swtpm socket [options]   (see nkp-swtpm socket --help)
       nkp-swtpm --version
`

// Main runs nkp-swtpm with args (os.Args without the program name) and returns the
// process exit code. SIGTERM, SIGINT and SIGHUP end a running vTPM cleanly (TPM2_Shutdown,
// state saved, sockets removed).
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, topUsage)
		return 1
	}
	switch args[0] {
	case "socket":
	case "-h", "--help", "help":
		fmt.Fprint(stdout, topUsage)
		return 0
	case "--version", "-v", "version":
		fmt.Fprintf(stdout, "nkp-swtpm version %s (TPM 2.0, swtpm compatible)\n", Version)
		return 0
	// swtpm's own sentence leads both errors: scripts look for it to tell which
	// interfaces a swtpm has (swtpm's tests: `swtpm chardev --help | grep
	// "Unsupported TPM interface"`).
	case "chardev", "cuse":
		fmt.Fprintf(stderr, "Unsupported TPM interface type '%s'. nkp-swtpm: mode %q is not supported; nkp-swtpm runs only as `nkp-swtpm socket`\n", args[0], args[0])
		return 1
	default:
		fmt.Fprintf(stderr, "Unsupported TPM interface type '%s'. nkp-swtpm: unknown mode %q\n%s", args[0], args[0], topUsage)
		return 1
	}
	o, err := cmdline.Parse(args[1:])
	if err != nil {
		fmt.Fprintf(stderr, "nkp-swtpm: %v\n", err)
		return 1
	}
	switch {
	case o.Help:
		fmt.Fprint(stdout, cmdline.Usage)
		return 0
	case o.Version:
		fmt.Fprintf(stdout, "nkp-swtpm version %s (TPM 2.0, swtpm compatible)\n", Version)
		return 0
	case o.PrintCapabilities:
		if err := PrintCapabilities(stdout); err != nil {
			fmt.Fprintf(stderr, "nkp-swtpm: %v\n", err)
			return 1
		}
		return 0
	}
	if o.State == nil {
		if dir := os.Getenv("TPM_PATH"); dir != "" {
			o.State = &cmdline.StateOptions{Dir: dir, Mode: 0o640, ModeDefault: true, Lock: true}
		}
	}
	if o.PrintStates {
		if o.State == nil {
			fmt.Fprintln(stderr, "nkp-swtpm: --print-states needs --tpmstate dir=<directory> or backend-uri=file://<file> (or TPM_PATH)")
			return 1
		}
		if err := printStates(o, stdout); err != nil {
			fmt.Fprintf(stderr, "nkp-swtpm: %v\n", err)
			return 1
		}
		return 0
	}
	notifier, isChild := childNotifier(os.Getenv)
	if o.Daemon && !isChild {
		return daemonize(o, args, stderr)
	}
	// Not os/signal: it keeps two OS threads for the life of the process.
	ctx, stop, err := termsig.NotifyContext(context.Background())
	if err != nil {
		fmt.Fprintf(stderr, "nkp-swtpm: %v\n", err)
		return 1
	}
	defer stop()
	if err := run(ctx, o, stderr, notifier); err != nil {
		notifier.Fail(err)
		fmt.Fprintf(stderr, "nkp-swtpm: %v\n", err)
		return 1
	}
	return 0
}

// run sets up the process as the options say and serves until ctx ends or the server
// stops (SHUTDOWN, --terminate, a fatal error). ready is told once clients can connect.
func run(ctx context.Context, o *cmdline.Options, stderr io.Writer, ready *readyNotifier) error {
	if o.State == nil {
		return fmt.Errorf("no state directory: give --tpmstate dir=<directory> (or set TPM_PATH)")
	}
	if o.Ctrl == nil && o.Server == nil {
		return fmt.Errorf("no channel to serve: give --ctrl and/or --server (see nkp-swtpm socket --help)")
	}
	// Keys never reach a core dump or a same-user debugger (again after --runas: the
	// kernel resets the flag when the user changes).
	if err := nodump.Apply(); err != nil {
		return err
	}
	// Like swtpm: change user before any file is opened.
	if o.RunAs != "" {
		if err := runAs(o.RunAs); err != nil {
			return err
		}
		if err := nodump.Apply(); err != nil {
			return err
		}
	}
	log, closeLog, err := openLog(o.Log, stderr)
	if err != nil {
		return err
	}
	defer closeLog()
	action, err := seccompAction(o.Seccomp)
	if err != nil {
		return err
	}
	// Built now, so that a kernel without seccomp refuses the start before the state
	// and the sockets are opened; installed once serving is about to begin.
	filter, err := seccomp.New(action)
	if err != nil {
		err = fmt.Errorf("--seccomp action=%v: %w", action, err)
		if o.Log != nil {
			log.Error("nkp-swtpm stops on an error", "err", err)
		}
		return err
	}
	removePid := func() {}
	defer func() { removePid() }()
	err = serve(ctx, o, log, serveHooks{
		// Once the sockets listen and the state directory is locked, before a byte
		// from a client is read (and before the TPM starts at launch).
		beforeServe: func() error {
			if err := filter.Install(); err != nil {
				return fmt.Errorf("--seccomp action=%v: %w", action, err)
			}
			return nil
		},
		// Logged once a control client already waiting was answered (the first log
		// line costs ~0.1 ms: the time zone, the handler's code), before the TPM's
		// start and before readiness is reported.
		serving: func() {
			if action == seccomp.None {
				log.Info("no seccomp filter (--seccomp action=none)")
			} else {
				log.Info("seccomp filter installed", "action", action)
			}
		},
		// Once the server is ready: the TPM started if it starts at launch.
		ready: func() error {
			rm, err := pidFile(o.Pid, os.Getpid())
			if err != nil {
				return err
			}
			removePid = rm
			ready.Ready()
			return nil
		},
	})
	if err != nil && o.Log != nil {
		// Main prints it on stderr too; the log file is where libvirt and
		// swtpm_setup point users.
		log.Error("nkp-swtpm stops on an error", "err", err)
	}
	return err
}

// seccompAction is the filter --seccomp asks for; without the option, Kill (swtpm's
// default).
func seccompAction(opt string) (seccomp.Action, error) {
	if opt == "" {
		return seccomp.Kill, nil
	}
	a, err := seccomp.ParseAction(opt)
	if err != nil {
		return 0, fmt.Errorf("--seccomp: %w", err)
	}
	return a, nil
}
