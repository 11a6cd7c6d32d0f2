// Package cli is the command line of nkp-hostd (cmd/nkp-hostd is its thin main):
//
//	nkp-hostd join --provider URL[,URL…] --ca-hash HASH [--token-file F | --token-stdin] [--tpm SPEC|none]
//	nkp-hostd serve [--state-dir D] [--run-dir D] [--tpm SPEC|none] [--swtpm PATH] …
//
// The join token comes from a file, stdin or a terminal prompt, never argv. serve runs
// the daemon (package hostd) until SIGTERM or SIGINT, tells systemd READY=1 once it
// serves and sends WATCHDOG=1 while its local API answers.
//
// Importers: cmd/nkp-hostd and tests.
package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/nkp-dev/nkp/hostd"
	"github.com/nkp-dev/nkp/internal/logflag"
	"github.com/nkp-dev/nkp/internal/schedslice"
	"github.com/nkp-dev/nkp/systemd"
)

type options struct {
	cfg                 hostd.Config
	logLevel, logFormat string
	providers, caHash   string
	tokenFile, hostname string
	tokenStdin          bool
}

func (o *options) logger(w io.Writer) (*slog.Logger, error) {
	return logflag.New(w, o.logLevel, o.logFormat)
}

// Main runs nkp-hostd with args (without the program name).
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	o := &options{}
	root := &cobra.Command{Use: "nkp-hostd", Short: "nkp host daemon: KDK cache in the host TPM, libvirt hook, vTPMs", SilenceUsage: true, SilenceErrors: true}
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.StringVar(&o.cfg.StateDir, "state-dir", hostd.DefaultStateDir, "the host's identity, KDK cache (TPM blobs) and vTPM states")
	pf.StringVar(&o.cfg.TPM, "tpm", "", "host TPM: /dev/tpmrm0 (default), a device, swtpm:path=DATA_SOCK[,ctrl=CTRL_SOCK], or none")
	pf.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	pf.StringVar(&o.logFormat, "log-format", "json", "json or text")

	join := &cobra.Command{
		Use:   "join",
		Short: "enroll this host with a provider (once); the token comes from --token-file, --token-stdin or a prompt",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := o.logger(stderr)
			if err != nil {
				return err
			}
			tok, err := readToken(o.tokenFile, o.tokenStdin, stdin, stderr)
			if err != nil {
				return err
			}
			var urls []string
			for _, u := range strings.Split(o.providers, ",") {
				if u = strings.TrimSpace(u); u != "" {
					urls = append(urls, u)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			res, err := hostd.Join(ctx, hostd.JoinConfig{StateDir: o.cfg.StateDir, Providers: urls, CAHash: o.caHash, Token: tok, Hostname: o.hostname, TPM: o.cfg.TPM, Log: log})
			if err != nil {
				return err
			}
			tpm := "its TPM's endorsement key registered: KDKs are cached TPM-bound"
			if !res.TPM {
				tpm = "no TPM: KDKs are kept in memory only, a restart needs the provider"
			}
			fmt.Fprintf(stdout, "joined provider %s as host %s (%s); start nkp-hostd serve\n", res.Provider, res.HostID, tpm)
			return nil
		},
	}
	join.Flags().StringVar(&o.providers, "provider", "", "provider URL(s), comma-separated replicas (https://HOST:PORT)")
	join.Flags().StringVar(&o.caHash, "ca-hash", "", "the provider CA's pin (sha256:…), printed with the token")
	join.Flags().StringVar(&o.tokenFile, "token-file", "", "read the join token from this file")
	join.Flags().BoolVar(&o.tokenStdin, "token-stdin", false, "read the join token from standard input")
	join.Flags().StringVar(&o.hostname, "hostname", "", "name in the provider's inventory (default: the host name)")

	serve := &cobra.Command{
		Use:   "serve",
		Short: "run the host daemon",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := o.logger(stderr)
			if err != nil {
				return err
			}
			o.cfg.Log = log
			return serveDaemon(o.cfg, log)
		},
	}
	sf := serve.Flags()
	sf.StringVar(&o.cfg.RunDir, "run-dir", hostd.DefaultRunDir, "sockets: hook.sock, hostd.sock, vtpm/<uuid>.sock")
	sf.StringVar(&o.cfg.HookSocket, "hook-socket", "", "the hook's socket (default RUN-DIR/hook.sock)")
	sf.StringVar(&o.cfg.APISocket, "socket", "", "the local API's socket (default RUN-DIR/hostd.sock)")
	sf.StringVar(&o.cfg.SwtpmBinary, "swtpm", "", "nkp-swtpm (default: next to nkp-hostd, else in PATH)")
	sf.StringVar(&o.cfg.SwtpmSetup, "swtpm-setup", "", "swtpm_setup, which manufactures new vTPMs as libvirt does (default: from PATH; \"none\": libtpms' defaults, no EK certificate)")
	sf.StringVar(&o.cfg.VTPMUser, "vtpm-user", hostd.DefaultVTPMUser, "unprivileged user that runs nkp-swtpm")
	sf.StringVar(&o.cfg.QEMUUser, "qemu-user", hostd.DefaultQEMUUser, "the user QEMU runs as (owns the vTPM sockets)")
	sf.StringVar(&o.cfg.LibvirtURI, "libvirt", hostd.DefaultLibvirtURI, "libvirt connection for lifecycle events and VM operations; - for none")
	sf.DurationVar(&o.cfg.SyncInterval, "sync-interval", hostd.DefaultSyncInterval, "how often to ask the provider for KDK changes, revocation and renewal")
	sf.DurationVar(&o.cfg.RenewBefore, "renew-before", 0, "renew the host certificate when less than this is left (0: a third of its lifetime)")
	sf.DurationVar(&o.cfg.HookTimeout, "hook-timeout", hostd.DefaultHookTimeout, "bound on answering one hook call")
	root.AddCommand(join, serve)
	root.SetArgs(args)
	return root.Execute()
}

func serveDaemon(cfg hostd.Config, log *slog.Logger) error {
	// hostd's sockets get their mode by chmod after bind; in between they have the
	// umask's. Group and others never get write (connect) permission from it, whatever
	// umask the daemon was started with (its unit sets 0077).
	syscall.Umask(syscall.Umask(0) | 0o022)
	// hostd answers hooks that hold libvirtd's workers, and the vTPMs it starts inherit
	// this: during a boot storm their wake-ups preempt the QEMUs starting instead of
	// queueing behind them (go doc internal/schedslice).
	if err := schedslice.Set(schedslice.Short); err != nil {
		log.Warn("short scheduler time slice not set; hooks may wait longer while many VMs start", "err", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := hostd.Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-d.Ready()
	if err := systemd.Ready(); err != nil {
		log.Warn("sd_notify READY failed", "err", err)
	}
	if iv, err := systemd.WatchdogInterval(); err == nil && iv > 0 {
		go systemd.RunWatchdog(ctx, log, iv, func(context.Context) error {
			select {
			case <-d.Done():
				return errors.New("daemon stopped")
			default:
				return nil
			}
		})
	}
	select {
	case <-ctx.Done():
		systemd.Stopping()
		log.Info("nkp-hostd stopping; running vTPMs keep running")
		d.Close()
		return nil
	case <-d.Done():
		return d.Err()
	}
}

// readToken reads the join token: first line of a file or of stdin, or a prompt.
func readToken(file string, fromStdin bool, stdin io.Reader, stderr io.Writer) (string, error) {
	switch {
	case file != "" && fromStdin:
		return "", errors.New("--token-file and --token-stdin: choose one")
	case file != "":
		raw, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("--token-file: %w", err)
		}
		return firstLine(string(raw), "--token-file "+file)
	case fromStdin:
		line, err := bufio.NewReader(io.LimitReader(stdin, 64<<10)).ReadString('\n')
		if err != nil && err != io.EOF {
			return "", fmt.Errorf("--token-stdin: %w", err)
		}
		return firstLine(line, "standard input")
	}
	f, ok := stdin.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return "", errors.New("no join token: pass --token-file FILE or --token-stdin, or run on a terminal to be prompted (never on the command line)")
	}
	fmt.Fprint(stderr, "Join token: ")
	b, err := term.ReadPassword(int(f.Fd()))
	fmt.Fprintln(stderr)
	if err != nil {
		return "", fmt.Errorf("reading the token from the terminal: %w", err)
	}
	return firstLine(string(b), "the terminal")
}

func firstLine(s, from string) (string, error) {
	line, _, _ := strings.Cut(s, "\n")
	line = strings.TrimSpace(line)
	if line == "" {
		return "", fmt.Errorf("empty join token in %s", from)
	}
	return line, nil
}
