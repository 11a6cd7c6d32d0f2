// Package daemon runs nkp-provider: it lays out and opens a provider directory (root key,
// store, admin credentials), initialises or restores a provider, and serves the HTTPS
// API of package provider/api with graceful shutdown. cmd/nkp-provider and cmd/nkpctl
// are thin wrappers around it, and tests start it in-process with Start.
//
// A running daemon has the shape of etcd's embed.Etcd: Start returns a *Daemon whose
// Ready channel closes once the listener serves, whose Done channel closes when it has
// stopped, and whose Err says why. Every serving goroutine ends through one supervisor,
// so a listener that dies (Serve returns) fails /healthz and /readyz, stops the daemon
// and closes Done with the error: `nkp-provider serve` then exits non-zero and systemd
// restarts it, instead of a process that looks healthy with nothing listening.
//
// Shutdown drains: /readyz answers 503 while the listener stays open and in-flight
// requests finish (keep-alive is switched off, so clients reconnect and load balancers
// see the 503), then the listener closes. Connections are capped (MaxConns,
// MaxConnsPerSource) and a connection that sends no request within FirstRequestTimeout
// is closed; refusals are logged at Warn.
//
// Who may import it: cmd/nkp-provider, provider/cli and tests; never hostd or clients.
//
// A provider directory holds:
//
//	root.key     the provider root key (0600); replicas sharing an etcd store need the same file
//	provider.db  the bbolt store (0600), when --store bolt
//	ca.crt       the provider CA certificate (PEM)
//	admin.crt    nkpctl's admin certificate (PEM, 0600, role OU=nkp-admin)
//	admin.key    its key (PEM, 0600)
//
// Start, Init and Restore check the directory (closed to group and others) and every
// secret file in it (a regular file, not a link, closed to group and others) with
// CheckProviderDir, as rootkey.Load always checked root.key.
//
// The server's own TLS key lives only in memory: each start issues a fresh server
// certificate from the provider CA.
package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/api"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/systemd"
)

// Config configures a running provider.
type Config struct {
	// Dir is the provider directory (root key, store file, admin credentials).
	Dir string
	// Listen is the TCP address to serve on (host:port; port 0 picks one). Ignored when
	// systemd passes a socket (socket activation).
	Listen string
	// Store selects and configures the store.
	Store StoreConfig
	// Names are the DNS names and IP addresses put in the server certificate; empty means
	// localhost, 127.0.0.1, ::1 and the machine's host name.
	Names []string
	// Log is the daemon's structured log (audit events land there too).
	Log *slog.Logger
	// Registry for metrics; nil makes one.
	Registry *prometheus.Registry
	// ShutdownTimeout bounds the graceful shutdown; 0 means 10 s.
	ShutdownTimeout time.Duration
	// RootKeyTPM names the TPM the root key is sealed to (InitConfig.RootKeyTPM); empty
	// for a plain key file.
	RootKeyTPM string
	// Listener, when set, is served instead of listening on Listen (or a socket systemd
	// passed): tests and embedders hand in their own. The daemon closes it.
	Listener net.Listener
	// MaxConns caps the client connections open at once; 0 means DefaultMaxConns. It is
	// lowered to fit RLIMIT_NOFILE, with a warning.
	MaxConns int
	// MaxConnsPerSource caps the connections open at once from one IPv4 address or IPv6
	// /64; 0 means DefaultMaxConnsPerSource.
	MaxConnsPerSource int
	// FirstRequestTimeout closes a connection that has not delivered a request this long
	// after it was accepted (TLS handshake included); 0 means DefaultFirstRequestTimeout.
	FirstRequestTimeout time.Duration
}

// Validate checks the configuration and names the bad setting.
func (c *Config) Validate() error {
	if c.Dir == "" {
		return errors.New("--dir: the provider directory is required")
	}
	if c.Listen == "" && c.Listener == nil {
		return errors.New("--listen: an address (host:port) is required")
	}
	switch {
	case c.MaxConns < 0:
		return fmt.Errorf("--max-conns %d: must not be negative (0 means %d)", c.MaxConns, DefaultMaxConns)
	case c.MaxConnsPerSource < 0:
		return fmt.Errorf("--max-conns-per-source %d: must not be negative (0 means %d)", c.MaxConnsPerSource, DefaultMaxConnsPerSource)
	case c.FirstRequestTimeout < 0:
		return fmt.Errorf("first-request timeout %v: must not be negative (0 means %v)", c.FirstRequestTimeout, DefaultFirstRequestTimeout)
	}
	if c.Log == nil {
		return errors.New("daemon: Config.Log is nil")
	}
	return c.Store.Validate()
}

// Daemon is a running provider server.
type Daemon struct {
	cfg   Config
	p     *provider.Provider
	st    store.Store
	key   *rootkey.Key
	srv   *http.Server
	api   *api.Server
	ln    *connLimiter
	ready chan struct{}
	done  chan struct{}
	stop  chan context.Context // Shutdown's request to the supervisor

	readyOnce sync.Once
	mu        sync.Mutex
	err       error
}

// Start opens the provider in cfg.Dir and serves it. The provider must have been
// initialised (Init) or restored (Restore). Wait for Ready (or Done) before relying on
// the listener; cancel ctx or call Shutdown to stop, and watch Done: it also closes when
// serving fails, with the reason in Err.
func Start(ctx context.Context, cfg Config) (_ *Daemon, err error) {
	if err := cfg.Validate(); err != nil {
		if cfg.Listener != nil {
			cfg.Listener.Close()
		}
		return nil, err
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxConnsPerSource == 0 {
		cfg.MaxConnsPerSource = DefaultMaxConnsPerSource
	}
	if cfg.FirstRequestTimeout == 0 {
		cfg.FirstRequestTimeout = DefaultFirstRequestTimeout
	}
	cfg.MaxConns = clampToFDLimit(cfg.MaxConns, cfg.Log)
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
		cfg.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	d := &Daemon{cfg: cfg, ready: make(chan struct{}), done: make(chan struct{}), stop: make(chan context.Context)}
	raw := cfg.Listener
	defer func() {
		if err != nil {
			if raw != nil {
				raw.Close()
			}
			d.closeAll()
		}
	}()
	if err := CheckProviderDir(cfg.Dir); err != nil {
		return nil, err
	}
	if d.key, err = loadRootKey(cfg.Dir, cfg.RootKeyTPM); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("provider %s: %w (run `nkp-provider init` first, or copy the root key of the replica set)", cfg.Dir, err)
	} else if err != nil {
		return nil, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	if d.st, err = OpenStore(ctx, cfg.Dir, cfg.Store, cfg.Log); err != nil {
		return nil, err
	}
	if d.p, err = provider.Open(ctx, provider.Config{Store: d.st, RootKey: d.key, Log: cfg.Log, Now: time.Now}); err != nil {
		return nil, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	st, err := d.p.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("provider %s: %w (run `nkp-provider init --dir %s` or restore a backup)", cfg.Dir, err, cfg.Dir)
	}
	caHash, err := d.p.CAHash(ctx)
	if err != nil {
		return nil, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	cert, err := d.serverCert(ctx)
	if err != nil {
		return nil, err
	}
	if d.api, err = api.New(api.Config{Provider: d.p, Log: cfg.Log, Registry: cfg.Registry}); err != nil {
		return nil, err
	}
	if raw == nil {
		if raw, err = systemd.Listener(cfg.Listen); err != nil {
			return nil, err
		}
	}
	if d.ln, err = newConnLimiter(raw, &cfg, cfg.Registry, d.markReady); err != nil {
		return nil, err
	}
	d.srv = &http.Server{
		Handler:           markRequests(d.api.Handler()),
		ConnContext:       connContext,
		TLSConfig:         api.TLSConfig(cert),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(cfg.Log.Handler(), slog.LevelDebug),
	}
	cfg.Log.Info("provider serving", "addr", d.ln.Addr().String(), "provider_id", st.ProviderID,
		"state", string(st.State), "ca_hash", caHash, "store", cfg.Store.Kind,
		"max_conns", cfg.MaxConns, "max_conns_per_source", cfg.MaxConnsPerSource)
	served := make(chan error, 1) // one per serving goroutine
	go func() { served <- d.srv.ServeTLS(d.ln, "", "") }()
	go d.supervise(ctx, served, 1)
	return d, nil
}

// markReady closes Ready; the listener calls it when Serve first asks for a connection.
func (d *Daemon) markReady() { d.readyOnce.Do(func() { close(d.ready) }) }

// supervise is the one place the daemon stops: when a serving goroutine returns (its
// listener died), ctx ends, or Shutdown asks. It records why, drains, waits for every
// serving goroutine, closes the store, wipes the root key and closes Done.
func (d *Daemon) supervise(ctx context.Context, served <-chan error, running int) {
	var cause error
	var drainCtx context.Context
	select {
	case err := <-served:
		running--
		if err == nil || errors.Is(err, http.ErrServerClosed) {
			err = errors.New("the server stopped by itself")
		}
		cause = fmt.Errorf("provider server on %s: %w", d.ln.Addr(), err)
		d.api.Fail(cause) // /healthz and /readyz: 503 from now on
		d.cfg.Log.Error("provider server failed; stopping", "err", cause)
	case <-ctx.Done():
		d.cfg.Log.Info("provider stopping", "reason", context.Cause(ctx))
	case drainCtx = <-d.stop:
	}
	if drainCtx == nil {
		var cancel context.CancelFunc
		drainCtx, cancel = context.WithTimeout(context.Background(), d.cfg.ShutdownTimeout)
		defer cancel()
	}
	err := d.drain(drainCtx)
	for ; running > 0; running-- {
		if e := <-served; e != nil && !errors.Is(e, http.ErrServerClosed) && err == nil {
			err = fmt.Errorf("provider server on %s: %w", d.ln.Addr(), e)
		}
	}
	d.markReady() // a daemon that never served is not waited for
	d.closeAll()
	d.mu.Lock()
	if cause != nil {
		d.err = cause
	} else {
		d.err = err
	}
	d.mu.Unlock()
	close(d.done)
}

// drain answers /readyz with 503 while the listener stays open and the requests in
// flight finish (new connections are still served, keep-alive is off so clients
// reconnect and load balancers see the 503), then closes the listener and waits for the
// connections. Past ctx, the remaining connections are cut.
func (d *Daemon) drain(ctx context.Context) error {
	d.api.SetDraining()
	d.srv.SetKeepAlivesEnabled(false)
	waitErr := d.api.WaitIdle(ctx)
	err := d.srv.Shutdown(ctx)
	if err != nil {
		d.srv.Close()
		return fmt.Errorf("provider shutdown: %w (requests still running were cut)", err)
	}
	if waitErr != nil {
		return fmt.Errorf("provider shutdown: %w (requests still running were cut)", waitErr)
	}
	return nil
}

// serverCert issues a fresh server certificate from the provider CA for cfg.Names,
// with the CA certificate appended so that joining hosts can pin it.
func (d *Daemon) serverCert(ctx context.Context) (tls.Certificate, error) {
	names := d.cfg.Names
	if len(names) == 0 {
		names = []string{"localhost", "127.0.0.1", "::1"}
		if h, err := os.Hostname(); err == nil && h != "" && h != "localhost" {
			names = append(names, h)
		}
		if host, _, err := net.SplitHostPort(d.cfg.Listen); err == nil && host != "" && !contains(names, host) {
			names = append(names, host)
		}
	}
	key, csr, err := newKeyAndCSR(names[0])
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	der, err := d.p.IssueServerCert(ctx, csr, names)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate for %s: %w", strings.Join(names, ","), err)
	}
	caCert, err := d.p.CA(ctx)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der, caCert.Raw}, PrivateKey: key}, nil
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// Addr is the address the server listens on.
func (d *Daemon) Addr() net.Addr { return d.ln.Addr() }

// URL is https://ADDR of the server.
func (d *Daemon) URL() string { return "https://" + d.ln.Addr().String() }

// Provider is the domain the daemon serves.
func (d *Daemon) Provider() *provider.Provider { return d.p }

// Ready is closed once the listener serves (Serve is accepting connections), or when
// the daemon stopped before it did (then Done is closed too).
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Done is closed when the daemon has stopped: after Shutdown, after ctx given to Start
// ended, or because serving failed (Err says why).
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Err is the reason the daemon stopped: nil after a clean shutdown, the serving error
// when a listener died, or the shutdown's error when requests had to be cut. It is nil
// while the daemon runs.
func (d *Daemon) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// InFlight is the number of API requests being served now (probes not counted).
func (d *Daemon) InFlight() int { return d.api.InFlight() }

// Shutdown drains (see the package documentation) within ctx, then closes the store and
// wipes the root key. It returns Err; calling it again, or after the daemon stopped by
// itself, waits for Done and returns Err.
func (d *Daemon) Shutdown(ctx context.Context) error {
	select {
	case d.stop <- ctx:
	case <-d.done:
	}
	<-d.done
	return d.Err()
}

func (d *Daemon) closeAll() {
	if d.st != nil {
		if err := d.st.Close(); err != nil {
			d.cfg.Log.Warn("closing the store", "err", err)
		}
	}
	if d.key != nil {
		d.key.Wipe()
	}
}

// Healthy is the watchdog's check: serving has not failed and the store answers a
// status read.
func (d *Daemon) Healthy(ctx context.Context) error {
	select {
	case <-d.done:
		if err := d.Err(); err != nil {
			return err
		}
		return errors.New("the provider has stopped")
	default:
	}
	_, err := d.p.Status(ctx)
	return err
}
