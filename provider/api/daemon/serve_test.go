package daemon_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/logbuf"
)

// running is one in-process daemon on a listener the test owns.
type running struct {
	d    *daemon.Daemon
	dir  string
	ln   *net.TCPListener
	adm  *daemon.Admin
	logs *logbuf.Buffer
}

// startDaemon inits a bbolt provider in a new directory and serves it on a loopback
// listener the test keeps, with cfg's limits.
func startDaemon(t *testing.T, cfg daemon.Config) *running {
	t.Helper()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "p")
	if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	logs := &logbuf.Buffer{}
	cfg.Dir, cfg.Listener = dir, ln
	cfg.Log = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	d, err := daemon.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown(context.Background()) })
	select {
	case <-d.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("daemon not ready within 10 s")
	}
	adm, err := daemon.LoadAdmin(dir)
	if err != nil {
		t.Fatal(err)
	}
	return &running{d: d, dir: dir, ln: ln, adm: adm, logs: logs}
}

// httpClient is an admin client whose connections come from source (127.0.0.x).
func (r *running) httpClient(source string, keepAlive bool) *http.Client {
	pool := x509.NewCertPool()
	pool.AddCert(r.adm.CA)
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}, Timeout: 5 * time.Second}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext:       dialer.DialContext,
		TLSClientConfig:   &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{r.adm.Certificate}, ServerName: "127.0.0.1"},
		DisableKeepAlives: !keepAlive,
	}}
}

func get(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

// within polls cond until it holds or d passes.
func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestDeadListener: when the listener dies under a running daemon, the daemon does not
// stay up looking healthy: Done closes, Err says which listener failed and why, and the
// watchdog's health check fails.
func TestDeadListener(t *testing.T) {
	r := startDaemon(t, daemon.Config{})
	ctx := context.Background()
	if err := r.d.Healthy(ctx); err != nil {
		t.Fatalf("Healthy before: %v", err)
	}
	if code, _, err := get(r.httpClient("127.0.0.1", false), r.d.URL()+apiv1.PathHealthz); err != nil || code != 200 {
		t.Fatalf("/healthz before = %d, %v", code, err)
	}
	if r.d.Err() != nil {
		t.Fatalf("Err while running = %v", r.d.Err())
	}
	e2e.KillListener(t, r.ln)
	select {
	case <-r.d.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("Done not closed 15 s after the listener died: the daemon would stay up with nothing listening")
	}
	err := r.d.Err()
	if err == nil || !strings.Contains(err.Error(), r.ln.Addr().String()) || !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Err = %v, want the listener's address and its accept error (EINVAL)", err)
	}
	if herr := r.d.Healthy(ctx); herr == nil {
		t.Fatal("Healthy after the listener died = nil: the watchdog would keep the process alive")
	}
	if !strings.Contains(r.logs.String(), `"level":"ERROR","msg":"provider server failed; stopping"`) {
		t.Fatalf("no error logged:\n%s", r.logs.String())
	}
	if err := r.d.Shutdown(ctx); err == nil || err.Error() != r.d.Err().Error() {
		t.Fatalf("Shutdown after the failure = %v, want Err", err)
	}
}

// TestShutdownDrains: while a request is in flight, Shutdown keeps the listener open and
// /readyz answers 503 (load balancers take the replica out), /healthz still answers, and
// the listener closes only once the request is done.
func TestShutdownDrains(t *testing.T) {
	r := startDaemon(t, daemon.Config{ShutdownTimeout: 30 * time.Second})
	hc := r.httpClient("127.0.0.1", false)
	url := r.d.URL()

	// An in-flight request: a backup verification whose body the test holds open.
	body, feed := io.Pipe()
	req, err := http.NewRequest(http.MethodPost, url+apiv1.PathBackupVerify, body)
	if err != nil {
		t.Fatal(err)
	}
	slow := r.httpClient("127.0.0.1", false)
	answered := make(chan int, 1)
	go func() {
		resp, err := slow.Do(req)
		if err != nil {
			answered <- -1
			return
		}
		resp.Body.Close()
		answered <- resp.StatusCode
	}()
	io.WriteString(feed, `{"passphrase":"cHc=","archive":"`)
	within(t, 10*time.Second, "the request is in flight", func() bool { return r.d.InFlight() == 1 })

	stopped := make(chan error, 1)
	go func() { stopped <- r.d.Shutdown(context.Background()) }()
	within(t, 10*time.Second, "/readyz answers 503 while draining", func() bool {
		code, body, err := get(hc, url+apiv1.PathReadyz)
		return err == nil && code == http.StatusServiceUnavailable && strings.Contains(body, "shutting down")
	})
	if code, _, err := get(hc, url+apiv1.PathHealthz); err != nil || code != 200 {
		t.Fatalf("/healthz while draining = %d, %v; want 200 (the process is healthy, only leaving)", code, err)
	}
	select {
	case err := <-stopped:
		t.Fatalf("Shutdown returned (%v) with a request in flight", err)
	default:
	}

	io.WriteString(feed, `AAAA"}`)
	feed.Close()
	if code := <-answered; code != http.StatusBadRequest {
		t.Fatalf("the in-flight request was answered %d, want 400 (bad archive): it was cut", code)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Shutdown = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last request finished")
	}
	if c, err := net.DialTimeout("tcp", r.ln.Addr().String(), 2*time.Second); err == nil {
		c.Close()
		t.Fatal("the listener still accepts after Shutdown")
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(ents)
}

// TestConnectionCaps: one source holding many idle connections gets only its share; the
// rest are refused at once (and logged at warn), another source's /healthz still answers,
// the daemon's descriptors stay bounded, and the idle connections are closed once the
// first-request timeout passes, HTTP/2 ones included.
func TestConnectionCaps(t *testing.T) {
	const perSource, hog = 8, 200
	r := startDaemon(t, daemon.Config{MaxConns: 32, MaxConnsPerSource: perSource, FirstRequestTimeout: 2 * time.Second})
	addr := r.ln.Addr().String()
	other := r.httpClient("127.0.0.3", true)
	if code, _, err := get(other, r.d.URL()+apiv1.PathHealthz); err != nil || code != 200 {
		t.Fatalf("/healthz = %d, %v", code, err)
	}
	base := openFDs(t)

	// A served, kept-alive connection from 127.0.0.3 is not idle-closed later.
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	for range hog {
		c, err := d.Dial("tcp", addr)
		if errors.Is(err, syscall.ECONNRESET) {
			continue // refused so fast that connect(2) saw the reset
		}
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		conns = append(conns, c)
	}
	refused := func() int {
		_, body, err := get(other, r.d.URL()+apiv1.PathMetrics)
		if err != nil {
			return -1
		}
		n := 0
		for line := range strings.Lines(body) {
			if strings.HasPrefix(line, `nkp_provider_connections_refused_total{reason="max_conns_per_source"}`) {
				fmt.Sscan(strings.Fields(line)[1], &n)
			}
		}
		return n
	}
	within(t, 10*time.Second, "the connections over the per-source cap refused", func() bool { return refused() == hog-perSource })
	if code, _, err := get(r.httpClient("127.0.0.4", false), r.d.URL()+apiv1.PathHealthz); err != nil || code != 200 {
		t.Fatalf("/healthz from another source while one holds %d connections = %d, %v", hog, code, err)
	}
	// The test holds hog client descriptors; the daemon may hold perSource of them, plus
	// the other sources' few.
	if got, bound := openFDs(t)-base, hog+perSource+8; got > bound {
		t.Fatalf("%d more descriptors open with %d idle connections from one source, want at most %d", got, hog, bound)
	}
	if !strings.Contains(r.logs.String(), `"level":"WARN","msg":"connection refused: 8 connections are open from this source`) {
		t.Fatalf("refusal not logged at warn:\n%s", r.logs.String())
	}

	// An HTTP/2 connection that completes TLS and its preface but sends no request.
	pool := x509.NewCertPool()
	pool.AddCert(r.adm.CA)
	h2, err := tls.DialWithDialer(&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 5)}}, "tcp", addr,
		&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("h2 dial: %v", err)
	}
	defer h2.Close()
	if p := h2.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q, want h2", p)
	}
	io.WriteString(h2, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00") // preface + empty SETTINGS
	opened := time.Now()

	// Every idle connection is closed by the daemon after the first-request timeout.
	closed := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.Copy(io.Discard, c) // returns at EOF or reset
		return err == nil || !errors.Is(err, os.ErrDeadlineExceeded)
	}
	if !closed(h2) {
		t.Fatal("an HTTP/2 connection that sent no request was kept open")
	}
	if held := time.Since(opened); held < time.Second {
		t.Fatalf("the HTTP/2 connection was closed after %v, before the 2 s first-request timeout", held)
	}
	for i, c := range conns[:perSource+4] {
		if !closed(c) {
			t.Fatalf("idle connection %d from 127.0.0.2 still open", i)
		}
	}
	// The kept-alive connection of 127.0.0.3 served requests, so it is still there.
	reused := false
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused },
	}), http.MethodGet, r.d.URL()+apiv1.PathHealthz, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := other.Do(req)
	if err != nil || resp.StatusCode != 200 || !reused {
		t.Fatalf("/healthz on the kept-alive connection = %v, %v, reused %v; want 200 on the same connection", resp, err, reused)
	}
	resp.Body.Close()
	if !strings.Contains(r.logs.String(), "connection closed: no request within 2s") {
		t.Fatalf("idle close not logged:\n%s", r.logs.String())
	}
}
