// Package etcdtest starts real etcd servers (Debian's etcd-server) for tests and
// benchmarks: a cluster of one or more members on free loopback ports, with data and logs
// in a directory of its own, ready when Start returns, stopped by Stop.
//
// Tests call New, which skips (or fails under NKP_E2E=required) when etcd is missing and
// stops the cluster at the end of the test:
//
//	c := etcdtest.New(t, etcdtest.Config{})
//	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints()})
//
// Programs (the provider benchmark) call Start and Stop themselves. The servers run with
// --max-txn-ops 16384 and --max-request-bytes 16 MiB, the limits nkp's provider documents
// for its etcd: a restore writes every host in one transaction.
//
// Only test and benchmark code imports it.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nkp-dev/nkp/test/e2e"
)

// Binary is the etcd program looked up in $PATH.
const Binary = "etcd"

// Config describes the cluster. The zero value is one member in a temporary directory.
type Config struct {
	// Members: how many etcd members; 0 means 1.
	Members int
	// Dir holds each member's data and log; "" makes a temporary directory that Stop
	// removes.
	Dir string
	// QuotaBytes sets --quota-backend-bytes (0: etcd's default, 2 GiB), to test a full store.
	QuotaBytes int64
	// StartTimeout bounds the wait until every member answers; 0 means 30 s.
	StartTimeout time.Duration
	// Log receives start and stop lines; nil discards them.
	Log *slog.Logger
	// TLS serves clients over https and requires a client certificate from the
	// cluster's own CA (Cluster.TLSFiles, Cluster.ClientTLS); peers stay on http.
	TLS bool
}

// Cluster is a running etcd cluster.
type Cluster struct {
	members   []*Member
	dir       string
	tempDir   bool
	log       *slog.Logger
	tlsFiles  *TLSFiles   // nil without Config.TLS
	clientTLS *tls.Config // nil without Config.TLS
}

// Member is one etcd process.
type Member struct {
	Name      string
	ClientURL string
	PeerURL   string
	DataDir   string
	LogPath   string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has been reaped
	waitErr error
}

// New starts a cluster for t, stopped when t ends. It skips t when etcd is not installed
// (fails it under NKP_E2E=required) and fails t when the cluster does not come up.
func New(t testing.TB, cfg Config) *Cluster {
	t.Helper()
	e2e.Require(t, Binary)
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("etcdtest: stop: %v", err)
		}
	})
	return c
}

// Start starts the cluster and returns when every member answers a read, or with an
// error that carries the tail of the failing member's log. ctx bounds the start only.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if _, err := exec.LookPath(Binary); err != nil {
		return nil, fmt.Errorf("etcd not found in $PATH: %w (install Debian's etcd-server)", err)
	}
	if cfg.Members <= 0 {
		cfg.Members = 1
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cluster{dir: cfg.Dir, log: log}
	if c.dir == "" {
		d, err := os.MkdirTemp("", "nkp-etcdtest-")
		if err != nil {
			return nil, fmt.Errorf("etcd data directory: %w", err)
		}
		c.dir, c.tempDir = d, true
	}
	if cfg.TLS {
		f, err := makeTLS(c.dir)
		if err == nil {
			c.clientTLS, err = f.clientTLS()
		}
		if err != nil {
			if c.tempDir {
				os.RemoveAll(c.dir)
			}
			return nil, err
		}
		c.tlsFiles = f
	}
	// A free port can be taken by someone else between our probe and etcd's bind; try
	// again with new ports when that happens.
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		err = c.start(ctx, cfg, attempt)
		if err == nil {
			return c, nil
		}
		c.kill()
		if !errors.Is(err, errAddrInUse) || ctx.Err() != nil {
			break
		}
		log.Warn("etcd start: port taken, retrying with other ports", "attempt", attempt)
	}
	if c.tempDir {
		os.RemoveAll(c.dir)
	}
	return nil, err
}

var errAddrInUse = errors.New("address already in use")

func (c *Cluster) start(ctx context.Context, cfg Config, attempt int) error {
	c.members = nil
	ports, err := freePorts(2 * cfg.Members)
	if err != nil {
		return err
	}
	var initial []string
	for i := 0; i < cfg.Members; i++ {
		scheme := "http"
		if c.tlsFiles != nil {
			scheme = "https"
		}
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: scheme + "://127.0.0.1:" + strconv.Itoa(ports[2*i]),
			PeerURL:   "http://127.0.0.1:" + strconv.Itoa(ports[2*i+1]),
		}
		base := filepath.Join(c.dir, fmt.Sprintf("%s.%d", m.Name, attempt))
		m.DataDir, m.LogPath = base+".data", base+".log"
		c.members = append(c.members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	token := fmt.Sprintf("nkp-etcdtest-%d-%d", os.Getpid(), time.Now().UnixNano())
	for _, m := range c.members {
		args := []string{
			"--name", m.Name,
			"--data-dir", m.DataDir,
			"--listen-client-urls", m.ClientURL,
			"--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.PeerURL,
			"--initial-advertise-peer-urls", m.PeerURL,
			"--initial-cluster", strings.Join(initial, ","),
			"--initial-cluster-state", "new",
			"--initial-cluster-token", token,
			"--heartbeat-interval", "50",
			"--election-timeout", "500",
			"--max-txn-ops", "16384",
			"--max-request-bytes", strconv.Itoa(16 << 20),
			"--logger", "zap",
			"--log-outputs", "stderr",
		}
		if f := c.tlsFiles; f != nil {
			args = append(args, "--cert-file", f.serverCert, "--key-file", f.serverKey,
				"--trusted-ca-file", f.CA, "--client-cert-auth")
		}
		if cfg.QuotaBytes > 0 {
			args = append(args, "--quota-backend-bytes", strconv.FormatInt(cfg.QuotaBytes, 10))
		}
		if err := m.spawn(args); err != nil {
			return err
		}
		c.log.Info("etcd member started", "name", m.Name, "client", m.ClientURL, "pid", m.cmd.Process.Pid)
	}
	startCtx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	defer cancel()
	for _, m := range c.members {
		if err := m.waitReady(startCtx, c.clientTLS); err != nil {
			return err
		}
	}
	return nil
}

func (m *Member) spawn(args []string) error {
	logf, err := os.OpenFile(m.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("etcd member %s: log file: %w", m.Name, err)
	}
	defer logf.Close()
	cmd := exec.Command(Binary, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = cleanEnv()
	// Own process group (a ^C to the test does not reach etcd first) and killed if the
	// test process dies, so no etcd outlives its test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("etcd member %s: start %s: %w", m.Name, Binary, err)
	}
	done := make(chan struct{})
	m.mu.Lock()
	m.cmd, m.done = cmd, done
	m.mu.Unlock()
	go func() {
		err := cmd.Wait()
		m.mu.Lock()
		m.waitErr = err
		m.mu.Unlock()
		close(done)
	}()
	return nil
}

// cleanEnv drops ETCD_* variables, which etcd would read as flags.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD_") && !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	return env
}

func (m *Member) waitReady(ctx context.Context, tlsCfg *tls.Config) error {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{m.ClientURL},
		DialTimeout: time.Second,
		TLS:         tlsCfg,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return fmt.Errorf("etcd member %s: client: %w", m.Name, err)
	}
	defer cli.Close()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if !m.Running() {
			return m.failure("exited during start")
		}
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		_, last = cli.Get(rctx, "nkp-etcdtest-ready")
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return m.failure(fmt.Sprintf("not answering (%v, last error: %v)", ctx.Err(), last))
		case <-m.done:
		case <-tick.C:
		}
	}
}

// failure describes why m did not start, with the tail of its log.
func (m *Member) failure(what string) error {
	tail := m.logTail(2048)
	err := fmt.Errorf("etcd member %s at %s %s; log %s ends with:\n%s", m.Name, m.ClientURL, what, m.LogPath, tail)
	if bytes.Contains([]byte(tail), []byte("address already in use")) {
		return fmt.Errorf("%w: %w", errAddrInUse, err)
	}
	return err
}

func (m *Member) logTail(n int64) string {
	f, err := os.Open(m.LogPath)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "(" + err.Error() + ")"
	}
	off := fi.Size() - n
	if off < 0 {
		off = 0
	}
	buf := make([]byte, fi.Size()-off)
	_, _ = f.ReadAt(buf, off)
	return string(buf)
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("etcdtest: find a free loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Endpoints returns the client URLs of all members, for clientv3.Config.Endpoints.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// TLSFiles returns the CA and client certificate files of a cluster started with
// Config.TLS, nil otherwise.
func (c *Cluster) TLSFiles() *TLSFiles { return c.tlsFiles }

// ClientTLS returns a client TLS configuration trusting the cluster's CA and presenting
// its client certificate (Config.TLS), nil otherwise.
func (c *Cluster) ClientTLS() *tls.Config {
	if c.clientTLS == nil {
		return nil
	}
	return c.clientTLS.Clone()
}

// Members returns the members, in start order.
func (c *Cluster) Members() []*Member { return c.members }

// Dir returns the directory holding the members' data and logs.
func (c *Cluster) Dir() string { return c.dir }

// Running reports whether the member's process has not exited.
func (m *Member) Running() bool {
	m.mu.Lock()
	done := m.done
	m.mu.Unlock()
	if done == nil {
		return false
	}
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// Kill ends the member at once (SIGKILL) and waits until it is reaped: a crash.
func (m *Member) Kill() error { return m.signalAndWait(syscall.SIGKILL, 10*time.Second) }

// Stop ends the member with SIGTERM, and SIGKILL when it has not exited after 10 s.
func (m *Member) Stop() error {
	err := m.signalAndWait(syscall.SIGTERM, 10*time.Second)
	if errors.Is(err, errStillRunning) {
		return m.Kill()
	}
	return err
}

var errStillRunning = errors.New("still running")

func (m *Member) signalAndWait(sig syscall.Signal, wait time.Duration) error {
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("etcd member %s: signal %v: %w", m.Name, sig, err)
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-done:
		return nil
	case <-timer.C:
		return fmt.Errorf("etcd member %s (pid %d): %w %v after %v", m.Name, cmd.Process.Pid, errStillRunning, sig, wait)
	}
}

func (c *Cluster) kill() {
	for _, m := range c.members {
		_ = m.Kill()
	}
}

// Stop stops every member and removes the temporary directory Start made. It is safe to
// call more than once.
func (c *Cluster) Stop() error {
	var errs []error
	for _, m := range c.members {
		if err := m.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.tempDir {
		if err := os.RemoveAll(c.dir); err != nil {
			errs = append(errs, fmt.Errorf("etcd data directory: %w", err))
		}
	}
	c.log.Info("etcd cluster stopped", "members", len(c.members))
	return errors.Join(errs...)
}
