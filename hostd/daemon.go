package hostd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nkp-dev/nkp/hostd/disksecret"
	"github.com/nkp-dev/nkp/hostd/hosttpm"
	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/hostd/vtpm"
	"github.com/nkp-dev/nkp/provider/client"
)

// Daemon is a running host daemon.
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	tpm     *hosttpm.TPM // nil without a TPM
	cache   *kdkcache.Cache
	sup     *vtpm.Supervisor
	pc      *client.Client
	metrics *metrics

	hookLn, apiLn net.Listener
	apiSrv        *http.Server
	mux           *http.ServeMux

	ready, done chan struct{}
	cancel      context.CancelFunc
	wg          sync.WaitGroup

	mu      sync.Mutex
	id      *identity // guarded by mu (certificate renewal, provider ID, revocation)
	online  bool      // the last provider request reached it; guarded by mu
	since   time.Time // when online last changed; guarded by mu
	lastOK  time.Time // last successful release; guarded by mu
	keySet  string    // key set of the last release applied to the cache ("" = none); guarded by mu
	err     error     // guarded by mu
	stopped bool      // guarded by mu

	vmLocks vmLocks // hooks of one VM run one at a time
	kick    chan struct{}
	vmAPI   lateHandler                        // hostd/vm's handler, once libvirt is connected
	secrets atomic.Pointer[disksecret.Manager] // the disks' libvirt secrets, once libvirt is connected
	syncMu  sync.Mutex                         // one on-demand sync at a time (syncNow)

	syncStarts, syncDone atomic.Uint64 // Syncs begun; the highest begun number that ended (syncNow)
}

// Start starts a host daemon for a joined host. The returned Daemon serves until ctx
// ends, Close is called or a serving goroutine fails.
func Start(ctx context.Context, cfg Config) (_ *Daemon, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := makeDirs(cfg.StateDir); err != nil {
		return nil, err
	}
	id, err := loadIdentity(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: cfg.Log, id: id, ready: make(chan struct{}), done: make(chan struct{}), kick: make(chan struct{}, 1), online: true}
	defer func() {
		if err != nil {
			d.closeResources()
		}
	}()
	wantTPM := cfg.TPM != TPMNone || cfg.OpenTPM != nil
	switch {
	case id.info.TPM && !wantTPM:
		return nil, fmt.Errorf("--tpm none: this host joined with its TPM (its KDKs are wrapped for it); start nkp-hostd with that TPM (--tpm)")
	case !id.info.TPM && wantTPM:
		cfg.Log.Warn("this host joined without a TPM: KDKs are kept in memory only; the TPM named by --tpm is not used", "tpm", cfg.TPM)
	}
	if id.info.TPM {
		if d.tpm, err = openHostTPM(cfg.TPM, cfg.OpenTPM); err != nil {
			return nil, fmt.Errorf("%w: the KDK cache of this host can only be unwrapped by the TPM it joined with", err)
		}
		d.cache, err = kdkcache.Open(filepath.Join(cfg.StateDir, dirKDK), d.tpm, cfg.Log)
	} else {
		d.cache, err = kdkcache.Open(filepath.Join(cfg.StateDir, dirKDK), nil, cfg.Log)
	}
	if err != nil {
		return nil, err
	}
	d.pc, err = client.New(client.Config{URL: id.info.ProviderURLs[0], Replicas: id.info.ProviderURLs[1:], CA: id.ca, Certificate: id.cert, Timeout: 15 * time.Second})
	if err != nil {
		return nil, err
	}
	d.sup, err = vtpm.New(vtpm.Config{
		Binary: cfg.SwtpmBinary, StateRoot: filepath.Join(cfg.StateDir, dirVTPM), RunDir: filepath.Join(cfg.RunDir, "vtpm"),
		User: vtpm.Credential{UID: cfg.vtpmCred.uid, GID: cfg.vtpmCred.gid}, QEMU: vtpm.Credential{UID: cfg.qemuCred.uid, GID: cfg.qemuCred.gid},
		Log: cfg.Log,
	})
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.RunDir, 0o755); err != nil {
		return nil, err
	}
	adopted, err := d.sup.Adopt()
	if err != nil {
		return nil, err
	}
	if len(adopted) > 0 {
		cfg.Log.Info("re-adopted running vTPMs", "count", len(adopted))
	}
	d.metrics = newMetrics(cfg.Registry, d)
	if d.hookLn, err = listenRootOnly(cfg.HookSocket); err != nil {
		return nil, fmt.Errorf("hook socket: %w", err)
	}
	if d.apiLn, err = listenRootOnly(cfg.APISocket); err != nil {
		return nil, fmt.Errorf("API socket: %w", err)
	}
	d.mux = d.apiMux()
	d.apiSrv = &http.Server{Handler: d.mux, ReadHeaderTimeout: 10 * time.Second}

	ctx, d.cancel = context.WithCancel(ctx)
	d.goServe(ctx, "hook server", d.serveHooks)
	d.goServe(ctx, "local API", func(ctx context.Context) error {
		err := d.apiSrv.Serve(d.apiLn)
		if errors.Is(err, http.ErrServerClosed) && ctx.Err() != nil {
			return nil
		}
		return err
	})
	d.goServe(ctx, "provider sync", d.syncLoop)
	d.goServe(ctx, "vTPM exits", d.watchExits)
	if cfg.LibvirtURI != "-" {
		d.goServe(ctx, "libvirt", d.runLibvirt)
	}
	d.goServe(ctx, "stop", func(ctx context.Context) error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		d.apiSrv.Shutdown(sctx)
		d.hookLn.Close()
		return nil
	})
	go func() {
		d.wg.Wait()
		d.closeResources()
		close(d.done)
	}()
	close(d.ready)
	cfg.Log.Info("nkp-hostd serving", "host_id", id.info.HostID, "hook_socket", cfg.HookSocket, "api_socket", cfg.APISocket,
		"tpm", id.info.TPM, "kdk_versions", len(d.cache.Versions()), "vtpms", d.sup.Running())
	return d, nil
}

// goServe runs one serving goroutine; its end (error or not, unless the daemon is
// stopping) stops the whole daemon.
func (d *Daemon) goServe(ctx context.Context, name string, f func(context.Context) error) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		err := f(ctx)
		if ctx.Err() == nil {
			if err == nil {
				err = errors.New("ended unexpectedly")
			}
			d.fail(fmt.Errorf("%s: %w", name, err))
		}
	}()
}

func (d *Daemon) fail(err error) {
	d.mu.Lock()
	if d.err == nil && !d.stopped {
		d.err = err
		d.log.Error("nkp-hostd stops", "err", err)
	}
	d.mu.Unlock()
	d.cancel()
}

// Ready is closed once the sockets listen.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Done is closed when the daemon has stopped.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Err is why the daemon stopped; nil after Close or the end of Start's ctx.
func (d *Daemon) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// Close stops serving and waits. Running vTPMs keep running (a new hostd re-adopts them).
func (d *Daemon) Close() error {
	d.mu.Lock()
	d.stopped = true
	d.mu.Unlock()
	d.cancel()
	<-d.done
	return nil
}

// HostID is the ID the provider gave this host.
func (d *Daemon) HostID() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.id.info.HostID
}

// Provider is the client of the provider (the hostd/vm catalog).
func (d *Daemon) Provider() *client.Client { return d.pc }

// Handle mounts h on the local API for pattern (net/http.ServeMux syntax). Call it
// before clients use the pattern (after Start returns).
func (d *Daemon) Handle(pattern string, h http.Handler) { d.mux.Handle(pattern, h) }

func (d *Daemon) closeResources() {
	if d.hookLn != nil {
		d.hookLn.Close()
	}
	if d.apiLn != nil {
		d.apiLn.Close()
	}
	if d.cache != nil {
		d.cache.Close()
	}
	if d.tpm != nil {
		d.tpm.Close()
	}
	if d.pc != nil {
		d.pc.Close()
	}
}

// listenRootOnly listens on a unix socket that only root can connect to (0600).
func listenRootOnly(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket: move it away", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another nkp-hostd is serving there", path)
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// watchExits logs vTPMs that ended on their own (QEMU sent SHUTDOWN or went away).
func (d *Daemon) watchExits(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case uuid := <-d.sup.Exits():
			d.log.Info("vTPM ended with its VM", "uuid", uuid)
		}
	}
}
