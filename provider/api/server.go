package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/ca"
)

// Config configures a Server.
type Config struct {
	// Provider is the domain (a *provider.Provider in production, a fake in tests).
	Provider Provider
	// Log receives one line per refused request and per administrative action.
	Log *slog.Logger
	// Registry receives the server's metrics and is served at /metrics; nil makes one
	// with the Go and process collectors.
	Registry *prometheus.Registry
	// Ready reports readiness for /readyz; nil asks Provider.Status.
	Ready func(context.Context) error
	// Now is the clock for certificate validity; nil means time.Now.
	Now func() time.Time
}

// Server is the HTTP handler of nkp-provider.
type Server struct {
	p        Provider
	log      *slog.Logger
	reg      *prometheus.Registry
	ready    func(context.Context) error
	now      func() time.Time
	draining atomic.Bool
	failed   atomic.Pointer[error]
	inflight inflight
	mux      *http.ServeMux
	m        metrics
}

// New checks cfg and builds the Server.
func New(cfg Config) (*Server, error) {
	if cfg.Provider == nil {
		return nil, errors.New("api: Config.Provider is nil")
	}
	if cfg.Log == nil {
		return nil, errors.New("api: Config.Log is nil: pass the daemon's logger")
	}
	s := &Server{p: cfg.Provider, log: cfg.Log, reg: cfg.Registry, ready: cfg.Ready, now: cfg.Now}
	if s.now == nil {
		s.now = time.Now
	}
	if s.reg == nil {
		s.reg = prometheus.NewRegistry()
		s.reg.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	}
	if s.ready == nil {
		s.ready = func(ctx context.Context) error { _, err := s.p.Status(ctx); return err }
	}
	m, err := newMetrics(s.reg)
	if err != nil {
		return nil, err
	}
	s.m = m
	s.routes()
	return s, nil
}

// Handler returns the root handler.
func (s *Server) Handler() http.Handler { return s.mux }

// SetDraining makes /readyz fail (503) so load balancers stop sending new requests while
// a graceful shutdown lets the current ones finish (WaitIdle).
func (s *Server) SetDraining() { s.draining.Store(true) }

// Fail records that serving failed (a listener died): from now on /healthz and /readyz
// answer 503 with err, on whatever listener still reaches the handler. The daemon then
// stops, and its service manager restarts it.
func (s *Server) Fail(err error) {
	if err == nil {
		err = errors.New("stopped")
	}
	s.failed.CompareAndSwap(nil, &err)
}

// failure is the error given to Fail, or nil.
func (s *Server) failure() error {
	if e := s.failed.Load(); e != nil {
		return *e
	}
	return nil
}

// InFlight is the number of API requests being served now (health, readiness and metrics
// probes are not counted).
func (s *Server) InFlight() int { return s.inflight.count() }

// WaitIdle returns once no API request is in flight (probes are not counted), or with
// ctx's error. Requests may start again after it returns unless the listener is closed.
func (s *Server) WaitIdle(ctx context.Context) error { return s.inflight.wait(ctx) }

// inflight counts running requests and signals when the count drops to zero.
type inflight struct {
	mu   sync.Mutex
	n    int
	idle chan struct{} // closed when n drops to 0; nil while n == 0
}

func (f *inflight) add() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.n == 0 {
		f.idle = make(chan struct{})
	}
	f.n++
}

func (f *inflight) done() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n--
	if f.n == 0 {
		close(f.idle)
		f.idle = nil
	}
}

func (f *inflight) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

func (f *inflight) wait(ctx context.Context) error {
	f.mu.Lock()
	idle := f.idle
	f.mu.Unlock()
	if idle == nil {
		return nil
	}
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TLSConfig is the server side of the provider's mTLS: TLS 1.3 only, the server
// certificate (whose chain should end with the CA certificate, so joining hosts can pin
// it), and client certificates requested but verified per route by the handler (hosts,
// admins) so that a refusal is a JSON error and not a bare handshake failure.
func TLSConfig(server tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{server},
		ClientAuth:   tls.RequestClientCert,
	}
}

func (s *Server) routes() {
	mux := http.NewServeMux()
	s.mux = mux
	handle := func(pattern, route string, h http.HandlerFunc) {
		mux.Handle(pattern, s.instrument(route, h))
	}
	handle("GET "+apiv1.PathHealthz, "healthz", s.handleHealthz)
	handle("GET "+apiv1.PathReadyz, "readyz", s.handleReadyz)
	mux.Handle("GET "+apiv1.PathMetrics, promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))

	handle("POST "+apiv1.PathEnroll, "enroll", s.handleEnroll)
	handle("GET "+apiv1.PathHostKDKs, "host_kdks", s.handleRelease)
	handle("POST "+apiv1.PathHostObjects, "host_objects", s.host(s.handleRegisterObject))
	handle("DELETE "+apiv1.PathHostObjects+"/{vm}/{name}", "host_objects_delete", s.host(s.handleUnregisterObject))
	handle("DELETE "+apiv1.PathHostObjects+"/{vm}", "host_objects_forget", s.host(s.handleForgetVM))
	handle("POST "+apiv1.PathHostMoves, "host_moves", s.host(s.handleMoveVM))
	handle("POST "+apiv1.PathHostRenew, "host_renew", s.handleRenew)

	handle("GET "+apiv1.PathStatus, "status", s.admin(s.handleStatus))
	handle("POST "+apiv1.PathBackup, "backup", s.admin(s.handleBackup))
	handle("POST "+apiv1.PathBackupVerify, "backup_verify", s.admin(s.handleBackupVerify))
	handle("POST "+apiv1.PathBackupConfirm, "backup_confirm", s.admin(s.handleBackupConfirm))
	handle("POST "+apiv1.PathTokens, "tokens", s.admin(s.handleCreateToken))
	handle("GET "+apiv1.PathHosts, "hosts", s.admin(s.handleHosts))
	handle("POST "+apiv1.PathHosts+"/{id}/revoke", "revoke", s.admin(s.handleRevoke))
	handle("POST "+apiv1.PathRotate, "rotate", s.admin(s.handleRotate))
	handle("POST "+apiv1.PathKDKs+"/{version}/retire", "retire", s.admin(s.handleRetire))
	handle("GET "+apiv1.PathObjects, "objects", s.admin(s.handleObjects))
	handle("POST "+apiv1.PathObjectsForget, "objects_forget", s.admin(s.handleForgetObjects))
	handle("GET "+apiv1.PathAudit, "audit", s.admin(s.handleAudit))
	handle("POST "+apiv1.PathAuditVerify, "audit_verify", s.admin(s.handleAuditVerify))
	handle("POST "+apiv1.PathAuditPrune, "audit_prune", s.admin(s.handleAuditPrune))
	handle("GET "+apiv1.PathPolicy, "policy", s.admin(s.handlePolicy))
	handle("PUT "+apiv1.PathPolicy, "policy_set", s.admin(s.handleSetPolicy))
	handle("GET "+apiv1.PathAdmins, "admins", s.admin(s.handleAdmins))
	handle("POST "+apiv1.PathAdmins, "admins_add", s.admin(s.handleAdminCert))
	handle("POST "+apiv1.PathAdminsRevoke, "admins_revoke", s.admin(s.handleRevokeAdmin))
	handle("/", "unknown", func(w http.ResponseWriter, r *http.Request) {
		var allow []string
		for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete} {
			r2 := r.Clone(r.Context())
			r2.Method = m
			if _, pattern := mux.Handler(r2); pattern != "/" && pattern != "" {
				allow = append(allow, m)
			}
		}
		if len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			s.writeError(w, r, &codedError{status: http.StatusMethodNotAllowed, code: apiv1.CodeBadRequest,
				msg: fmt.Sprintf("%s does not accept %s; use %s", r.URL.Path, r.Method, strings.Join(allow, " or "))})
			return
		}
		s.writeError(w, r, &codedError{status: http.StatusNotFound, code: apiv1.CodeNotFound,
			msg: fmt.Sprintf("no route %s %s; see the provider/api package documentation", r.Method, r.URL.Path)})
	})
}

// statusWriter remembers the status for metrics.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// probes are the routes that WaitIdle does not wait for.
var probes = map[string]bool{"healthz": true, "readyz": true}

func (s *Server) instrument(route string, h http.HandlerFunc) http.Handler {
	counted := !probes[route]
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if counted {
			s.inflight.add()
			defer s.inflight.done()
		}
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.log.Error("api: handler panic", "route", route, "panic", fmt.Sprint(v))
				if sw.status == 0 {
					s.writeError(sw, r, errors.New("internal error"))
				}
			}
			if sw.status == 0 {
				sw.status = http.StatusOK
			}
			s.m.requests.WithLabelValues(route, strconv.Itoa(sw.status)).Inc()
			s.m.duration.WithLabelValues(route).Observe(time.Since(start).Seconds())
		}()
		h(sw, r)
	})
}

// peerCert returns the TLS client's leaf certificate, unverified: the domain verifies
// its chain, validity and role (Provider.AuthorizeHost, ReleaseTo, RenewHost,
// AuthorizeAdmin), with one cache, so it is checked in one place. Without a certificate
// the answer is 401.
func peerCert(r *http.Request, role ca.Role) (*x509.Certificate, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return nil, &codedError{status: http.StatusUnauthorized, code: apiv1.CodeUnauthenticated,
			msg: fmt.Sprintf("this endpoint needs a client certificate from the provider's CA (role %s); hosts get one with `nkp-hostd join`, admins use the one in the provider directory", role)}
	}
	return r.TLS.PeerCertificates[0], nil
}

// authError turns the domain's refusal of a client certificate into a sentence that says
// what to do; other errors pass unchanged.
func authError(cert *x509.Certificate, role ca.Role, err error) error {
	switch {
	case errors.Is(err, ca.ErrWrongRole):
		return &codedError{status: http.StatusForbidden, code: apiv1.CodeForbidden, cause: err,
			msg: fmt.Sprintf("client certificate %q has role %q; this endpoint needs role %q", cert.Subject.CommonName, ca.RoleOf(cert), role)}
	case errors.Is(err, ca.ErrNotIssued):
		return &codedError{status: http.StatusUnauthorized, code: apiv1.CodeUnauthenticated, cause: err,
			msg: fmt.Sprintf("client certificate %q is not valid for this provider (not issued by its CA, or expired): %v; hosts get one with `nkp-hostd join`, admins use the one in the provider directory", cert.Subject.CommonName, err)}
	}
	return err
}

type hostHandler func(w http.ResponseWriter, r *http.Request, hostID string)

// host authenticates a host on every request with Provider.AuthorizeHost: a client
// certificate chained to the CA with the host role, of a known host that is not revoked.
func (s *Server) host(h hostHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		cert, err := peerCert(r, ca.RoleHost)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		host, err := s.p.AuthorizeHost(r.Context(), cert)
		if err != nil {
			s.writeError(w, r, authError(cert, ca.RoleHost, err))
			return
		}
		h(w, r, host.ID)
	}
}

// admin authenticates nkpctl on every request with Provider.AuthorizeAdmin: a client
// certificate chained to the CA with the admin role, not revoked (it reads the store).
func (s *Server) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		cert, err := peerCert(r, ca.RoleAdmin)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		if err := s.p.AuthorizeAdmin(r.Context(), cert); err != nil {
			s.writeError(w, r, authError(cert, ca.RoleAdmin, err))
			return
		}
		s.log.Info("api: admin request", "admin", cert.Subject.CommonName, "method", r.Method, "path", r.URL.Path)
		h(w, r.WithContext(provider.WithActor(r.Context(), "admin:"+cert.Subject.CommonName)))
	}
}

// failedError is the 503 of /healthz and /readyz after Fail.
func failedError(err error) error {
	return &codedError{status: http.StatusServiceUnavailable, code: apiv1.CodeUnavailable,
		msg: fmt.Sprintf("the provider's server failed (%v) and is stopping; its service manager restarts it", err)}
}

func (s *Server) handleHealthz(w http.ResponseWriter, r *http.Request) {
	if err := s.failure(); err != nil {
		s.writeError(w, r, failedError(err))
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, "ok\n")
}

func (s *Server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	if err := s.failure(); err != nil {
		s.writeError(w, r, failedError(err))
		return
	}
	if s.draining.Load() {
		s.writeError(w, r, &codedError{status: http.StatusServiceUnavailable, code: apiv1.CodeUnavailable,
			msg: fmt.Sprintf("shutting down: draining %d requests in flight; send new requests to another replica", s.InFlight())})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.ready(ctx); err != nil {
		s.writeError(w, r, &codedError{status: http.StatusServiceUnavailable, code: apiv1.CodeUnavailable,
			msg: fmt.Sprintf("not ready: %v", err)})
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, "ready\n")
}

// decodeBody reads a JSON body of type T through http.MaxBytesReader.
func decodeBody[T any](w http.ResponseWriter, r *http.Request, limit int64) (T, error) {
	body := http.MaxBytesReader(w, r.Body, limit)
	v, err := apiv1.Decode[T](body, limit)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) || errors.Is(err, apiv1.ErrTooLong) {
			return v, &codedError{status: http.StatusRequestEntityTooLarge, code: apiv1.CodeTooLarge,
				msg: fmt.Sprintf("request body longer than %d bytes", limit)}
		}
		return v, err
	}
	return v, nil
}

// writeJSON encodes v; the encoded bytes are wiped after writing (responses may carry
// keys or import blobs).
func (s *Server) writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		s.log.Error("api: encoding response", "err", err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	defer clear(buf.Bytes())
	w.Header().Set("Content-Type", apiv1.ContentTypeJSON)
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}
