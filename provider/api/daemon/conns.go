package daemon

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Connection limits (Config.MaxConns, MaxConnsPerSource, FirstRequestTimeout) and their
// defaults. One unauthenticated client holding thousands of idle TCP connections used to
// exhaust the process's file descriptors, and /healthz stopped answering.
const (
	// DefaultMaxConns caps the connections open at once, from everyone.
	DefaultMaxConns = 4096
	// DefaultMaxConnsPerSource caps the connections open at once from one source: an IPv4
	// address, or an IPv6 /64 (what one machine usually holds). A host keeps one or two.
	DefaultMaxConnsPerSource = 64
	// DefaultFirstRequestTimeout is how long a new connection may take to complete its TLS
	// handshake and deliver its first request's headers (HTTP/1.1 or HTTP/2) before it is
	// closed. Connections that served a request are kept for the server's IdleTimeout.
	DefaultFirstRequestTimeout = 10 * time.Second
	// fdReserve is the file descriptors kept free for the store, the log and the process
	// below RLIMIT_NOFILE when MaxConns is clamped to it.
	fdReserve = 256
)

// Refusal reasons, in the log and in the metric nkp_provider_connections_refused_total.
const (
	reasonGlobal    = "max_conns"
	reasonPerSource = "max_conns_per_source"
	reasonIdle      = "no_request"
)

// connLimiter is the daemon's listener: it admits a connection only under both caps,
// closes at once (RST) the ones over a cap, and closes connections that deliver no
// request within firstRequest. Refusals are logged at Warn, at most one line per reason
// per second (with a count of the ones in between) so a flood cannot flood the log.
type connLimiter struct {
	net.Listener
	max, perSource int
	firstRequest   time.Duration
	log            *slog.Logger
	accepting      func() // called each time Serve asks for a connection (readiness)
	open           prometheus.Gauge
	refused        *prometheus.CounterVec

	mu       sync.Mutex
	n        int
	bySource map[string]int
	logged   map[string]time.Time // reason -> last Warn line
	quiet    map[string]int       // reason -> refusals not logged since
}

func newConnLimiter(ln net.Listener, cfg *Config, reg prometheus.Registerer, accepting func()) (*connLimiter, error) {
	l := &connLimiter{Listener: ln, max: cfg.MaxConns, perSource: cfg.MaxConnsPerSource, firstRequest: cfg.FirstRequestTimeout,
		log: cfg.Log, accepting: accepting, bySource: map[string]int{}, logged: map[string]time.Time{}, quiet: map[string]int{},
		open: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nkp_provider_connections_open",
			Help: "Client connections open now.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nkp_provider_connections_refused_total",
			Help: "Client connections closed by the daemon: over max_conns, over max_conns_per_source, or no_request (no request in time).",
		}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{l.open, l.refused} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("daemon: registering metrics: %w (one daemon per registry)", err)
		}
	}
	return l, nil
}

// sourceOf is the key a source's connections are counted under: the IPv4 address, or
// the IPv6 /64.
func sourceOf(a net.Addr) string {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	if ip4 := ta.IP.To4(); ip4 != nil {
		return ip4.String()
	}
	return (&net.IPNet{IP: ta.IP.Mask(net.CIDRMask(64, 128)), Mask: net.CIDRMask(64, 128)}).String()
}

// Accept returns the next admitted connection; errors of the underlying listener are
// returned unchanged (http.Server retries the temporary ones).
func (l *connLimiter) Accept() (net.Conn, error) {
	l.accepting()
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := sourceOf(c.RemoteAddr())
		if reason := l.admit(src); reason != "" {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0) // RST: no TIME_WAIT kept for a refused peer
			}
			c.Close()
			l.refuse(reason, src)
			continue
		}
		tc := &trackedConn{Conn: c, l: l, src: src}
		tc.timer = time.AfterFunc(l.firstRequest, tc.idleClose)
		return tc, nil
	}
}

func (l *connLimiter) admit(src string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.n >= l.max:
		return reasonGlobal
	case l.bySource[src] >= l.perSource:
		return reasonPerSource
	}
	l.n++
	l.bySource[src]++
	l.open.Set(float64(l.n))
	return ""
}

func (l *connLimiter) release(src string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n--
	if l.bySource[src]--; l.bySource[src] <= 0 {
		delete(l.bySource, src)
	}
	l.open.Set(float64(l.n))
}

// refuse counts a refusal and logs it at Warn, rate-limited per reason.
func (l *connLimiter) refuse(reason, src string) {
	l.refused.WithLabelValues(reason).Inc()
	now := time.Now()
	l.mu.Lock()
	if now.Sub(l.logged[reason]) < time.Second {
		l.quiet[reason]++
		l.mu.Unlock()
		return
	}
	l.logged[reason] = now
	quiet := l.quiet[reason]
	l.quiet[reason] = 0
	open, fromSource := l.n, l.bySource[src]
	l.mu.Unlock()
	var msg string
	switch reason {
	case reasonGlobal:
		msg = fmt.Sprintf("connection refused: %d connections are open, the limit (--max-conns)", open)
	case reasonPerSource:
		msg = fmt.Sprintf("connection refused: %d connections are open from this source, the limit (--max-conns-per-source)", fromSource)
	default:
		msg = fmt.Sprintf("connection closed: no request within %v of connecting", l.firstRequest)
	}
	l.log.Warn(msg, "source", src, "reason", reason, "not_logged_since_last", quiet)
}

// trackedConn is an admitted connection: it gives its slot back when closed, and is
// closed if no request arrives within the first-request timeout.
type trackedConn struct {
	net.Conn
	l         *connLimiter
	src       string
	timer     *time.Timer
	closeOnce sync.Once
}

// requestArrived stops the first-request timer: the connection has delivered a request.
func (c *trackedConn) requestArrived() { c.timer.Stop() }

func (c *trackedConn) idleClose() {
	c.l.refuse(reasonIdle, c.src)
	c.Close()
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		c.timer.Stop()
		c.l.release(c.src)
	})
	return err
}

// connKey carries a connection's *trackedConn in request contexts.
type connKey struct{}

// connContext is http.Server.ConnContext: it finds the trackedConn under the TLS layer.
func connContext(ctx context.Context, c net.Conn) context.Context {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if t, ok := c.(*trackedConn); ok {
		return context.WithValue(ctx, connKey{}, t)
	}
	return ctx
}

// markRequests tells each request's connection that a request arrived (HTTP/1.1 and
// HTTP/2 alike: an HTTP/2 connection's requests inherit its context).
func markRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if t, ok := r.Context().Value(connKey{}).(*trackedConn); ok {
			t.requestArrived()
		}
		h.ServeHTTP(w, r)
	})
}

// clampToFDLimit lowers max so that the connections, plus a reserve, fit under the
// process's RLIMIT_NOFILE; it says so in the log.
func clampToFDLimit(n int, log *slog.Logger) int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<40 {
		return n
	}
	if limit := int64(rl.Cur) - fdReserve; int64(n) > limit {
		clamped := int(max(limit, 16))
		log.Warn("--max-conns lowered to fit the open-files limit", "max_conns", n, "lowered_to", clamped,
			"rlimit_nofile", rl.Cur, "fix", "raise LimitNOFILE= in the unit, or lower --max-conns")
		return clamped
	}
	return n
}
