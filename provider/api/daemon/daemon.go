// Package daemon runs nkp-provider: it lays out and opens a provider directory (root key,
// store, admin credentials), initialises or restores a provider, and serves the HTTPS
// API of package provider/api with graceful shutdown. cmd/nkp-provider and cmd/nkpctl
// are thin wrappers around it, and tests start it in-process with Start.
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
}

// Validate checks the configuration and names the bad setting.
func (c *Config) Validate() error {
	if c.Dir == "" {
		return errors.New("--dir: the provider directory is required")
	}
	if c.Listen == "" {
		return errors.New("--listen: an address (host:port) is required")
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
	ln    net.Listener
	ready chan struct{}
	done  chan struct{}

	stopOnce sync.Once
	mu       sync.Mutex
	err      error
}

// Start opens the provider in cfg.Dir and serves it. The provider must have been
// initialised (Init) or restored (Restore). Cancel ctx or call Shutdown to stop.
func Start(ctx context.Context, cfg Config) (_ *Daemon, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	d := &Daemon{cfg: cfg, ready: make(chan struct{}), done: make(chan struct{})}
	defer func() {
		if err != nil {
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
	if d.ln, err = systemd.Listener(cfg.Listen); err != nil {
		return nil, err
	}
	d.srv = &http.Server{
		Handler:           d.api.Handler(),
		TLSConfig:         api.TLSConfig(cert),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(cfg.Log.Handler(), slog.LevelDebug),
	}
	cfg.Log.Info("provider serving", "addr", d.ln.Addr().String(), "provider_id", st.ProviderID,
		"state", string(st.State), "ca_hash", caHash, "store", cfg.Store.Kind)
	go d.serve()
	go func() {
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
			defer cancel()
			d.Shutdown(sctx)
		case <-d.done:
		}
	}()
	close(d.ready)
	return d, nil
}

func (d *Daemon) serve() {
	err := d.srv.ServeTLS(d.ln, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	d.mu.Lock()
	if d.err == nil && err != nil {
		d.err = fmt.Errorf("provider server on %s: %w", d.ln.Addr(), err)
	}
	d.mu.Unlock()
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

// Ready is closed once the server accepts connections.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Done is closed when the daemon has stopped.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Err is the reason the server stopped, nil after a clean shutdown.
func (d *Daemon) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// Shutdown stops accepting requests, marks /readyz as failing, waits (bounded by ctx)
// for current requests, then closes the store and wipes the root key.
func (d *Daemon) Shutdown(ctx context.Context) error {
	d.stopOnce.Do(func() {
		d.api.SetDraining()
		err := d.srv.Shutdown(ctx)
		if err != nil {
			d.srv.Close()
			err = fmt.Errorf("provider shutdown: %w (requests still running were cut)", err)
		}
		d.closeAll()
		d.mu.Lock()
		if d.err == nil {
			d.err = err
		}
		d.mu.Unlock()
		close(d.done)
	})
	<-d.done
	return d.Err()
}

func (d *Daemon) closeAll() {
	if d.ln != nil && d.srv == nil {
		d.ln.Close()
	}
	if d.st != nil {
		if err := d.st.Close(); err != nil {
			d.cfg.Log.Warn("closing the store", "err", err)
		}
	}
	if d.key != nil {
		d.key.Wipe()
	}
}

// Healthy is the watchdog's check: the store answers a status read.
func (d *Daemon) Healthy(ctx context.Context) error {
	_, err := d.p.Status(ctx)
	return err
}
