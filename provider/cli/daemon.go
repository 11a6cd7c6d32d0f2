// Package cli holds the command lines of the key provider: Main is nkp-provider (the
// daemon: init, serve) and Command is `nkpctl provider` (the operator's commands).
// Only cmd/nkp-provider and cmd/nkpctl import it.
//
// nkp-provider:
//
//	nkp-provider init  --dir D [--store bolt|etcd --etcd-endpoints URLS] [--tpm-required]
//	nkp-provider serve --dir D --listen ADDR [--store bolt|etcd --etcd-endpoints URLS] [--san NAME,...]
//
// With https:// etcd endpoints, --etcd-cacert names the CA of etcd's server certificate
// and --etcd-cert/--etcd-key the client certificate etcd's --client-cert-auth asks for.
//
// serve answers SIGTERM and SIGINT with a graceful shutdown (STOPPING=1 to systemd, readiness
// withdrawn, current requests finished), sends READY=1 once it accepts connections and
// keeps systemd's watchdog fed while the store answers. If serving fails (its listener
// dies) it stops and exits non-zero, so that systemd restarts it. Connections are capped
// (--max-conns, --max-conns-per-source) and refusals logged at warn. Replicas sharing one etcd store
// need the same root.key file in their --dir (copy it, 0600).
//
// --root-key-tpm /dev/tpmrm0 (or swtpm:path=SOCKET) at init seals the root key to the
// provider host's TPM instead of writing it in the clear; serve then needs the same flag,
// and the file opens on no other machine (keep the backup: it is the way back).
//
// nkpctl provider: init and restore act on --dir locally (the server stopped, for
// bolt); the other commands talk to --provider URL (environment NKP_PROVIDER) with the
// admin files of --dir (or --cert, --key, --ca), and --json gives machine output.
// Passphrases come from --passphrase-file, --passphrase-stdin or a terminal prompt,
// never argv. backup saves the archive (temp, fsync, rename, fsync dir), opens it
// again with the passphrase and confirms it; backup confirm --in F confirms a saved
// archive when that last step failed; backup verify opens an archive locally, without
// a provider. The operator's guide, with every command run: docs/provider.md.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/nkp-dev/nkp/internal/logflag"
	"github.com/nkp-dev/nkp/internal/nodump"
	"github.com/nkp-dev/nkp/internal/tpmdev"
	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/systemd"
)

type options struct {
	dir, listen, storeKind, etcd, etcdPrefix, sans, logLevel, logFormat string
	etcdCA, etcdCert, etcdKey, rootKeyTPM                               string
	tpmRequired                                                         bool
	shutdown                                                            time.Duration
	maxConns, maxConnsPerSource                                         int
}

func (o *options) store() daemon.StoreConfig {
	sc := daemon.StoreConfig{Kind: o.storeKind, EtcdPrefix: o.etcdPrefix, EtcdCACert: o.etcdCA, EtcdCert: o.etcdCert, EtcdKey: o.etcdKey}
	if o.etcd != "" {
		sc.EtcdEndpoints = strings.Split(o.etcd, ",")
	}
	return sc
}

func (o *options) logger(w io.Writer) (*slog.Logger, error) {
	return logflag.New(w, o.logLevel, o.logFormat)
}

// Main runs nkp-provider with args (without the program name).
func Main(args []string, stdout, stderr io.Writer) error {
	o := &options{}
	root := &cobra.Command{Use: "nkp-provider", Short: "nkp key provider", SilenceUsage: true, SilenceErrors: true,
		// init and serve hold the root key: keep it out of core dumps and debuggers.
		PersistentPreRunE: func(*cobra.Command, []string) error { return nodump.Apply() }}
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.StringVar(&o.dir, "dir", "/var/lib/nkp-provider", "provider directory (root key, store, admin credentials)")
	pf.StringVar(&o.storeKind, "store", daemon.StoreBolt, "store: bolt or etcd")
	pf.StringVar(&o.etcd, "etcd-endpoints", "", "etcd client URLs, comma-separated (--store etcd)")
	pf.StringVar(&o.etcdPrefix, "etcd-prefix", "", "key prefix in etcd (default /nkp/provider/)")
	pf.StringVar(&o.etcdCA, "etcd-cacert", "", "CA certificate (PEM) of etcd's server certificate, for https:// endpoints")
	pf.StringVar(&o.etcdCert, "etcd-cert", "", "client certificate (PEM) for etcd's --client-cert-auth")
	pf.StringVar(&o.etcdKey, "etcd-key", "", "key (PEM, mode 0600) of --etcd-cert")
	pf.StringVar(&o.rootKeyTPM, "root-key-tpm", "", "seal the root key to this TPM (init) / unseal it with it (serve): "+tpmdev.SpecHelp)
	pf.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	pf.StringVar(&o.logFormat, "log-format", "json", "json or text")

	initCmd := &cobra.Command{
		Use:   "init",
		Short: "create a provider in --dir (state NotBackedUp until the first backup)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := o.logger(stderr)
			if err != nil {
				return err
			}
			st, err := daemon.Init(context.Background(), daemon.InitConfig{Dir: o.dir, Store: o.store(), TPMRequired: o.tpmRequired, RootKeyTPM: o.rootKeyTPM, Log: log})
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "provider %s initialised in %s (state %s): take a backup before hosts can get keys\n", st.ProviderID, o.dir, st.State)
			return nil
		},
	}
	initCmd.Flags().BoolVar(&o.tpmRequired, "tpm-required", false, "refuse hosts without a TPM")

	serveCmd := &cobra.Command{
		Use:   "serve",
		Short: "serve the provider's HTTPS API",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := o.logger(stderr)
			if err != nil {
				return err
			}
			return serve(o, log)
		},
	}
	serveCmd.Flags().StringVar(&o.listen, "listen", ":8443", "address to listen on (host:port)")
	serveCmd.Flags().StringVar(&o.sans, "san", "", "DNS names and IPs for the server certificate, comma-separated (default: localhost, loopback, host name)")
	serveCmd.Flags().DurationVar(&o.shutdown, "shutdown-timeout", 10*time.Second, "how long a graceful shutdown waits for requests")
	serveCmd.Flags().IntVar(&o.maxConns, "max-conns", daemon.DefaultMaxConns, "client connections open at once, from everyone (lowered to fit the open-files limit)")
	serveCmd.Flags().IntVar(&o.maxConnsPerSource, "max-conns-per-source", daemon.DefaultMaxConnsPerSource, "client connections open at once from one IPv4 address or IPv6 /64")
	root.AddCommand(initCmd, serveCmd)
	root.SetArgs(args)
	return root.Execute()
}

func serve(o *options, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cfg := daemon.Config{Dir: o.dir, Listen: o.listen, Store: o.store(), Log: log, ShutdownTimeout: o.shutdown, RootKeyTPM: o.rootKeyTPM,
		MaxConns: o.maxConns, MaxConnsPerSource: o.maxConnsPerSource}
	if o.sans != "" {
		cfg.Names = strings.Split(o.sans, ",")
	}
	d, err := daemon.Start(context.Background(), cfg)
	if err != nil {
		return err
	}
	select {
	case <-d.Ready():
	case <-d.Done():
	}
	select {
	case <-d.Done():
		return stopped(d)
	default:
	}
	if err := systemd.Ready(); err != nil {
		log.Warn("readiness not signalled to systemd", "err", err)
	}
	wd, err := systemd.WatchdogInterval()
	if err != nil {
		log.Warn("watchdog disabled", "err", err)
	}
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	go systemd.RunWatchdog(wctx, log, wd, d.Healthy)

	select {
	case <-ctx.Done():
		log.Info("provider stopping", "reason", "signal")
	case <-d.Done():
		return stopped(d) // the listener died: exit non-zero so that systemd restarts us
	}
	wcancel()
	if err := systemd.Stopping(); err != nil {
		log.Warn("stopping not signalled to systemd", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), o.shutdown)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	log.Info("provider stopped")
	return nil
}

// stopped is the error of a daemon that stopped without being asked to: never nil, so
// the process exits non-zero and its service manager restarts it.
func stopped(d *daemon.Daemon) error {
	if err := d.Err(); err != nil {
		return err
	}
	return errors.New("provider server stopped without a shutdown request")
}
