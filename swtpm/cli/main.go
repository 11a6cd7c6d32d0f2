// Package cli is the command line of nkp-swtpm: it parses the swtpm command line that
// QEMU users, libvirt 9.0, swtpm_setup, swtpm_ioctl and swtpm_bios use (`nkp-swtpm
// socket [options]`, see Usage and specs/swtpm-protocol.md §3), and turns it into a
// running vTPM server from package swtpm: logging, pid file, --runas, --daemon, the
// control and data sockets, the state directory with its key, and the seccomp filter
// (package swtpm/seccomp).
//
// Parsing (Parse, Options) is pure and may be used by any package that builds an
// nkp-swtpm command line; Main is for cmd/nkp-swtpm only.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/nkp-dev/nkp/swtpm/seccomp"
)

// Usage is the help text of `nkp-swtpm socket --help`.
const Usage = `Usage: nkp-swtpm socket [options]

nkp-swtpm is a vTPM 2.0 (libtpms) that speaks swtpm's control and data protocol, so
QEMU (-tpmdev emulator), libvirt and the swtpm tools accept it in place of swtpm.
TPM 1.2 is not available: --tpm2 is required to run.

Options (as swtpm's; values in [] are optional):
--tpm2            choose TPM 2.0 (required except for --help, --version,
                  --print-capabilities)
--ctrl type=unixio,path=<path>|fd=<fd>|clientfd=<fd>[,mode=0...][,uid=..][,gid=..][,terminate]
--ctrl type=tcp,port=<port>[,bindaddr=<addr>[,ifname=<if>]]|fd=<fd>[,terminate]
                  control channel; fd= is a listening socket, clientfd= a connected
                  one; terminate exits when the control connection is lost
--server [type=tcp][,port=<port>[,bindaddr=<addr>]][,fd=<fd>][,disconnect]
--server type=unixio,path=<path>|fd=<fd>[,mode=0...][,uid=..][,gid=..][,disconnect]
                  data channel (without it: SET_DATAFD on the control channel);
                  type=tcp,fd= is a connected socket, type=unixio,fd= a listening one;
                  disconnect closes the connection after each response
-p|--port <port>  legacy: --server type=tcp,port=<port>,disconnect
-f|--fd <fd>      legacy: data on the connected fd <fd>, terminate when it closes
-t|--terminate    exit when the data connection is lost
--tpmstate dir=<dir>|backend-uri=dir://<dir>[,mode=0...][,lock][,backup][,fsync]
                  state directory (or $TPM_PATH); always locked against a second
                  process; state files are written atomically and synced (fsync is
                  implied); backup keeps <file>.bak and falls back to it when a
                  file cannot be read; backend-uri=file:// is not supported
--key file=<path>|fd=<fd>[,mode=aes-128-cbc|aes-256-cbc][,format=hex|binary][,remove]
--key pwdfile=<path>|pwdfd=<fd>[,mode=...][,kdf=pbkdf2|sha512][,remove]
                  key of the state files; nkp writes them with AES-256-GCM and reads
                  swtpm's AES-CBC files; without --key the state is plaintext (a
                  warning is logged); keys are never accepted in argv or environment
--migration-key   same sub-options: key of the state blobs on the control channel
--log file=<path>|fd=<fd>[,level=n][,prefix=<text>][,truncate]
                  log file (mode 0600; file=- disables logging); level >= 2 adds debug
--pid file=<path>|fd=<fd>
--flags [not-need-init][,startup-clear|startup-state|startup-deactivated|startup-none][,disable-auto-shutdown]
--locality [reject-locality-4][,allow-set-locality]
--migration [incoming][,release-lock-outgoing]
--seccomp action=none|log|kill
                  seccomp filter installed before the first client byte is read
                  (default kill, as swtpm): a denied system call (exec, fork,
                  ptrace, mount, module loading, bpf, keyctl, clock setting, ...)
                  kills the process with SIGSYS (kill), is allowed and logged by
                  the kernel (log), or no filter is installed (none)
-d|--daemon       run detached; the command returns once the daemon serves
-r|--runas <user> switch to this user before opening files and sockets
--print-capabilities  print the supported features as JSON and exit
--print-states    print the state blobs in --tpmstate as JSON and exit
--version         print the version and exit
-h|--help         print this help and exit
`

// topUsage is printed for `nkp-swtpm` without a mode.
const topUsage = `Usage: nkp-swtpm socket [options]   (see nkp-swtpm socket --help)
       nkp-swtpm --version
`

// Main runs nkp-swtpm with args (os.Args without the program name) and returns the
// process exit code. SIGTERM and SIGINT end a running vTPM cleanly (TPM2_Shutdown,
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
	case "chardev", "cuse":
		fmt.Fprintf(stderr, "nkp-swtpm: mode %q is not supported; nkp-swtpm runs only as `nkp-swtpm socket`\n", args[0])
		return 1
	default:
		fmt.Fprintf(stderr, "nkp-swtpm: unknown mode %q\n%s", args[0], topUsage)
		return 1
	}
	o, err := Parse(args[1:])
	if err != nil {
		fmt.Fprintf(stderr, "nkp-swtpm: %v\n", err)
		return 1
	}
	switch {
	case o.Help:
		fmt.Fprint(stdout, Usage)
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
			o.State = &StateOptions{Dir: dir, Mode: 0o640, ModeDefault: true, Lock: true}
		}
	}
	if o.PrintStates {
		if o.State == nil {
			fmt.Fprintln(stderr, "nkp-swtpm: --print-states needs --tpmstate dir=<directory> (or TPM_PATH)")
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
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
func run(ctx context.Context, o *Options, stderr io.Writer, ready *readyNotifier) error {
	if o.State == nil {
		return fmt.Errorf("no state directory: give --tpmstate dir=<directory> (or set TPM_PATH)")
	}
	if o.Ctrl == nil && o.Server == nil {
		return fmt.Errorf("no channel to serve: give --ctrl and/or --server (see nkp-swtpm socket --help)")
	}
	// Like swtpm: change user before any file is opened.
	if o.RunAs != "" {
		if err := runAs(o.RunAs); err != nil {
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
	// serve calls this once the sockets listen, the state directory is locked and the
	// TPM started if it starts at launch, and before it reads a byte from a client.
	err = serve(ctx, o, log, func() error {
		rm, err := pidFile(o.Pid, os.Getpid())
		if err != nil {
			return err
		}
		removePid = rm
		if err := filter.Install(); err != nil {
			return fmt.Errorf("--seccomp action=%v: %w", action, err)
		}
		if action == seccomp.None {
			log.Info("no seccomp filter (--seccomp action=none)")
		} else {
			log.Info("seccomp filter installed", "action", action)
		}
		ready.Ready()
		return nil
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
