package api_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/api"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/provider/store/storetest"
	"github.com/nkp-dev/nkp/test/logbuf"
)

// realEnv is the API over the real provider (package provider) over the mem store,
// served with TLS by httptest, with an admin client.
type realEnv struct {
	p  *provider.Provider
	st *storetest.FailStore
	served
}

// caFails is the real provider whose CA reads fail: the one fake part, to inject the
// failure at exactly that call.
type caFails struct {
	*provider.Provider
	err atomic.Pointer[error]
}

func (c *caFails) failing() error {
	if e := c.err.Load(); e != nil {
		return *e
	}
	return nil
}

func (c *caFails) CA(ctx context.Context) (*x509.Certificate, error) {
	if err := c.failing(); err != nil {
		return nil, err
	}
	return c.Provider.CA(ctx)
}

func (c *caFails) CAHash(ctx context.Context) (string, error) {
	if err := c.failing(); err != nil {
		return "", err
	}
	return c.Provider.CAHash(ctx)
}

// startReal inits a provider (not backed up: see backup) and serves its API.
func startReal(t *testing.T) *realEnv { return startRealWith(t, nil) }

// startRealWith is startReal with the API serving wrap(provider) when wrap is not nil.
func startRealWith(t *testing.T, wrap func(*provider.Provider) api.Provider) *realEnv {
	t.Helper()
	ctx := context.Background()
	rk, err := rootkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	logBuf := &logbuf.Buffer{}
	logger := slog.New(slog.NewTextHandler(logBuf, nil))
	st := &storetest.FailStore{Store: mem.New()}
	p, err := provider.Open(ctx, provider.Config{Store: st, RootKey: rk, Log: logger})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Init(ctx, provider.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	caCert, err := p.CA(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var dom api.Provider = p
	if wrap != nil {
		dom = wrap(p)
	}
	s, err := api.New(api.Config{Provider: dom, Log: logger})
	if err != nil {
		t.Fatal(err)
	}
	key := newKey(t)
	der, err := p.IssueServerCert(ctx, csrFor(t, key), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	srv := serveTLS(t, s.Handler(), tls.Certificate{Certificate: [][]byte{der, caCert.Raw}, PrivateKey: key})
	e := &realEnv{p: p, st: st, served: served{srv: srv, api: s, caCert: caCert, logBuf: logBuf}}
	e.admin = e.client(t, e.adminCert(t, "alice"))
	return e
}

// backup takes and confirms a backup, so that KDKs are released. It costs age's default
// scrypt work (tests outside package provider cannot lower it): call it only when needed.
func (e *realEnv) backup(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	info, err := e.p.Backup(ctx, io.Discard, []byte("correct horse battery staple"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.ConfirmBackup(ctx, info.SHA256); err != nil {
		t.Fatal(err)
	}
}

// adminCert issues an administrator certificate from the provider.
func (e *realEnv) adminCert(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key := newKey(t)
	der, err := e.p.IssueAdminCert(context.Background(), csrFor(t, key))
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// serverCert is the provider's own server certificate, presented as a client one.
func (e *realEnv) serverCert(t *testing.T) tls.Certificate {
	t.Helper()
	key := newKey(t)
	der, err := e.p.IssueServerCert(context.Background(), csrFor(t, key), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestAuthentication: client certificates are checked by the domain alone (one layer,
// one cache); the edge turns its refusals into 401 (no certificate, not this CA's, not
// a client certificate) and 403 (another role, unknown or revoked host).
func TestAuthentication(t *testing.T) {
	e := startReal(t)
	e.backup(t)
	_, hostCert, hostID := e.join(t, "kvm-01")
	_, goneCert, goneID := e.join(t, "kvm-02")
	if err := e.admin.Revoke(context.Background(), goneID); err != nil {
		t.Fatal(err)
	}
	other, err := ca.New("other-provider", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	admin := e.adminCert(t, "bob")
	tests := []struct {
		name     string
		certs    []tls.Certificate
		method   string
		path     string
		wantCode int
		wantErr  string
	}{
		{"host route without certificate", nil, "GET", apiv1.PathHostKDKs, 401, apiv1.CodeUnauthenticated},
		{"admin route without certificate", nil, "GET", apiv1.PathStatus, 401, apiv1.CodeUnauthenticated},
		{"host objects without certificate", nil, "POST", apiv1.PathHostObjects, 401, apiv1.CodeUnauthenticated},
		{"renew without certificate", nil, "POST", apiv1.PathHostRenew, 401, apiv1.CodeUnauthenticated},
		{"host certificate from another CA", []tls.Certificate{certFrom(t, other, ca.RoleHost, hostID)}, "GET", apiv1.PathHostKDKs, 401, apiv1.CodeUnauthenticated},
		{"admin certificate from another CA", []tls.Certificate{certFrom(t, other, ca.RoleAdmin, "mallory")}, "GET", apiv1.PathStatus, 401, apiv1.CodeUnauthenticated},
		{"host certificate on admin route", []tls.Certificate{hostCert}, "GET", apiv1.PathStatus, 403, apiv1.CodeForbidden},
		{"admin certificate on host route", []tls.Certificate{admin}, "GET", apiv1.PathHostKDKs, 403, apiv1.CodeForbidden},
		{"admin certificate on host objects", []tls.Certificate{admin}, "DELETE", apiv1.PathHostObjects + "/vm/vtpm", 403, apiv1.CodeForbidden},
		{"server certificate as client", []tls.Certificate{e.serverCert(t)}, "GET", apiv1.PathStatus, 401, apiv1.CodeUnauthenticated},
		{"revoked host", []tls.Certificate{goneCert}, "GET", apiv1.PathHostKDKs, 403, apiv1.CodeHostRevoked},
		{"enrolled host", []tls.Certificate{hostCert}, "GET", apiv1.PathHostKDKs, 200, ""},
		{"admin", []tls.Certificate{admin}, "GET", apiv1.PathStatus, 200, ""},
		{"health without certificate", nil, "GET", apiv1.PathHealthz, 200, ""},
		{"unknown route", nil, "GET", "/v1/nothing", 404, apiv1.CodeNotFound},
		{"wrong method", []tls.Certificate{admin}, "DELETE", apiv1.PathStatus, 405, apiv1.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, eb, _ := e.do(t, e.rawClient(tc.certs...), tc.method, tc.path, "")
			if code != tc.wantCode || (tc.wantErr != "" && eb.Code != tc.wantErr) {
				t.Fatalf("%s %s = %d %q (%s), want %d %q", tc.method, tc.path, code, eb.Code, eb.Error, tc.wantCode, tc.wantErr)
			}
			if tc.wantErr != "" && eb.Error == "" {
				t.Fatal("error body without a sentence")
			}
		})
	}
}

// TestCAReadFails: a failing CA read never panics a handler (CA() used to return nil,
// and x509.CertPool.AddCert(nil) panics); the handlers that need the CA answer 503 with a
// sentence and log the cause.
func TestCAReadFails(t *testing.T) {
	var cf *caFails
	e := startRealWith(t, func(p *provider.Provider) api.Provider { cf = &caFails{Provider: p}; return cf })
	ctx := context.Background()
	calls := []struct {
		name string
		fn   func() error
	}{
		{"status", func() error { _, err := e.admin.Status(ctx); return err }},
		{"create token", func() error { _, err := e.admin.CreateToken(ctx, time.Minute); return err }},
		{"add admin", func() error { _, err := e.admin.AddAdmin(ctx, "carol", newKey(t)); return err }},
	}
	injected := errors.New("etcd: connection to 10.0.0.9:2379 refused")
	cf.err.Store(&injected)
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			err := c.fn()
			var ae *client.APIError
			if !errors.As(err, &ae) || ae.Status != 503 || ae.Code != apiv1.CodeUnavailable || !strings.Contains(ae.Message, "CA certificate") {
				t.Fatalf("%s with the CA read failing: %v, want 503 unavailable with a sentence about the CA", c.name, err)
			}
			if strings.Contains(ae.Message, "10.0.0.9") {
				t.Fatalf("store detail leaked to the client: %q", ae.Message)
			}
		})
	}
	if !strings.Contains(e.logBuf.String(), "10.0.0.9") {
		t.Fatal("the cause was not logged for the operator")
	}
	cf.err.Store(nil)
	if _, err := e.admin.Status(ctx); err != nil {
		t.Fatalf("status after the store recovered: %v", err)
	}
}

// TestStoreFailures: the store's failures reach clients as their statuses (503 for a
// store that is closed, read-only or too slow; 500 for an unknown error, whose detail
// is logged and not sent), on admin and host routes alike, without a panic.
func TestStoreFailures(t *testing.T) {
	e := startReal(t)
	host, _, _ := e.join(t, "kvm-01")
	ctx := context.Background()
	type call struct {
		name string
		fn   func() error
	}
	calls := []call{
		{"status", func() error { _, err := e.admin.Status(ctx); return err }},
		{"create token", func() error { _, err := e.admin.CreateToken(ctx, time.Minute); return err }},
		{"release", func() error { _, err := host.Release(ctx); return err }},
		{"renew", func() error { _, err := host.Renew(ctx, newKey(t)); return err }},
		{"register object", func() error {
			return host.RegisterObject(ctx, apiv1.Object{VMUUID: "0b6f3c1e-2f43-4a7e-9d55-6c1a1e0f9a11", Name: "vtpm", KeyID: "k", KDKID: "d"})
		}},
	}
	tests := []struct {
		name       string
		err        error
		wantStatus int
		wantCode   string
	}{
		{"unknown store error", errors.New("etcd: connection to 10.0.0.9:2379 refused"), 500, apiv1.CodeInternal},
		{"store closed", fmt.Errorf("bolt: %w", store.ErrClosed), 503, apiv1.CodeUnavailable},
		{"store read-only", fmt.Errorf("bolt: %w", store.ErrReadOnly), 503, apiv1.CodeUnavailable},
		{"store full", fmt.Errorf("bolt: %w", store.ErrFull), 507, apiv1.CodeUnavailable},
		{"deadline", fmt.Errorf("etcd: %w", context.DeadlineExceeded), 503, apiv1.CodeUnavailable},
	}
	for _, tc := range tests {
		for _, c := range calls {
			t.Run(tc.name+"/"+c.name, func(t *testing.T) {
				e.st.Inject(tc.err)
				defer e.st.Inject(nil)
				err := c.fn()
				var ae *client.APIError
				if !errors.As(err, &ae) || ae.Status != tc.wantStatus || ae.Code != tc.wantCode || ae.Message == "" {
					t.Fatalf("%s with %v: %v, want %d %s with a sentence", c.name, tc.err, err, tc.wantStatus, tc.wantCode)
				}
				if strings.Contains(ae.Message, "10.0.0.9") {
					t.Fatalf("store detail leaked to the client: %q", ae.Message)
				}
			})
		}
	}
	if _, err := e.admin.Status(ctx); err != nil {
		t.Fatalf("status after the store recovered: %v", err)
	}
}

// TestHealthAfterServingFailed: once the daemon reports that serving failed (Fail),
// /healthz and /readyz answer 503 with the reason.
func TestHealthAfterServingFailed(t *testing.T) {
	e := startReal(t)
	hc := e.rawClient()
	for _, path := range []string{apiv1.PathHealthz, apiv1.PathReadyz} {
		if code, _, _ := e.do(t, hc, "GET", path, ""); code != 200 {
			t.Fatalf("%s = %d, want 200", path, code)
		}
	}
	e.api.Fail(errors.New("listener 0.0.0.0:8443: accept: invalid argument"))
	for _, path := range []string{apiv1.PathHealthz, apiv1.PathReadyz} {
		code, eb, _ := e.do(t, hc, "GET", path, "")
		if code != 503 || eb.Code != apiv1.CodeUnavailable || !strings.Contains(eb.Error, "accept: invalid argument") {
			t.Fatalf("%s after Fail = %d %q %q, want 503 naming the failure", path, code, eb.Code, eb.Error)
		}
	}
}

// TestReadiness: /readyz follows the store and the drain; /healthz only the process.
func TestReadiness(t *testing.T) {
	e := startReal(t)
	hc := e.rawClient()
	if code, _, _ := e.do(t, hc, "GET", apiv1.PathReadyz, ""); code != 200 {
		t.Fatalf("readyz = %d, want 200", code)
	}
	e.st.Inject(fmt.Errorf("etcd: %w", context.DeadlineExceeded))
	if code, eb, _ := e.do(t, hc, "GET", apiv1.PathReadyz, ""); code != 503 || eb.Code != apiv1.CodeUnavailable {
		t.Fatalf("readyz with a failing store = %d %q, want 503", code, eb.Code)
	}
	e.st.Inject(nil)
	e.api.SetDraining()
	if code, eb, _ := e.do(t, hc, "GET", apiv1.PathReadyz, ""); code != 503 || !strings.Contains(eb.Error, "shutting down") {
		t.Fatalf("readyz while draining = %d %q, want 503 shutting down", code, eb.Error)
	}
	if code, _, _ := e.do(t, hc, "GET", apiv1.PathHealthz, ""); code != 200 {
		t.Fatalf("healthz while draining = %d, want 200", code)
	}
	code, _, body := e.do(t, hc, "GET", apiv1.PathMetrics, "")
	for _, want := range []string{`nkp_provider_http_requests_total{code="503",route="readyz"} 2`, "nkp_provider_refusals_total", "go_goroutines"} {
		if code != 200 || !strings.Contains(body, want) {
			t.Fatalf("metrics (%d) lack %q:\n%s", code, want, body)
		}
	}
}

// TestInFlight: WaitIdle waits for API requests, not for probes.
func TestInFlight(t *testing.T) {
	e := startReal(t)
	ctx := context.Background()
	body, feed := io.Pipe()
	req, err := http.NewRequest(http.MethodPost, e.srv.URL+apiv1.PathBackupVerify, body)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := e.rawClient(e.adminCert(t, "dave")).Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	io.WriteString(feed, `{"passphrase":"cHc=",`)
	deadline := time.Now().Add(10 * time.Second)
	for e.api.InFlight() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the request is not counted in flight")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if code, _, _ := e.do(t, e.rawClient(), "GET", apiv1.PathHealthz, ""); code != 200 || e.api.InFlight() != 1 {
		t.Fatalf("healthz = %d, in flight %d", code, e.api.InFlight())
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := e.api.WaitIdle(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitIdle with a request in flight = %v, want the context's deadline", err)
	}
	io.WriteString(feed, `"archive":"AAAA"}`)
	feed.Close()
	<-done
	if err := e.api.WaitIdle(ctx); err != nil || e.api.InFlight() != 0 {
		t.Fatalf("WaitIdle after the request = %v, in flight %d", err, e.api.InFlight())
	}
}

func TestRevokedHostRefusedAtOnce(t *testing.T) {
	e := startReal(t)
	e.backup(t)
	host, _, id := e.join(t, "kvm-02")
	ctx := context.Background()
	if _, err := host.Release(ctx); err != nil {
		t.Fatalf("release before revoke: %v", err)
	}
	if err := e.admin.Revoke(ctx, id); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	// Same client, same kept-alive connection: the refusal must not wait for a new handshake.
	if _, err := host.Release(ctx); !client.IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("release after revoke: %v, want code %s", err, apiv1.CodeHostRevoked)
	}
	if err := e.admin.Revoke(ctx, "nobody"); !client.IsCode(err, apiv1.CodeHostUnknown) {
		t.Fatalf("revoke unknown host: %v, want %s", err, apiv1.CodeHostUnknown)
	}
}

func TestJoin(t *testing.T) {
	e := startReal(t)
	ctx := context.Background()
	tok, err := e.admin.CreateToken(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := ca.New("other", time.Now(), time.Hour)
	tests := []struct {
		name    string
		token   string
		caHash  string
		wantErr string // substring or code; "" = success
	}{
		{"wrong CA pin", tok.Secret, other.Hash(), "does not match the pinned hash"},
		{"malformed pin", tok.Secret, "md5:abc", "want sha256:"},
		{"unknown token", "nope", tok.CAHash, apiv1.CodeTokenInvalid},
		{"good", tok.Secret, tok.CAHash, ""},
		{"reused token", tok.Secret, tok.CAHash, apiv1.CodeTokenUsed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			enr, err := client.Join(ctx, client.JoinRequest{URL: e.srv.URL, Token: tc.token, CAHash: tc.caHash, Hostname: "h", Key: newKey(t)})
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("join: %v", err)
				}
				if enr.HostID == "" || !enr.CA.Equal(e.caCert) {
					t.Fatalf("enrollment %+v lacks host ID or the pinned CA", enr)
				}
				return
			}
			if err == nil || !(client.IsCode(err, tc.wantErr) || strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("join: %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestBadBodies(t *testing.T) {
	e := startReal(t)
	tok, err := e.admin.CreateToken(context.Background(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	adminHC := e.rawClient(e.adminCert(t, "alice"))
	tests := []struct {
		name     string
		hc       *http.Client
		method   string
		path     string
		body     string
		wantCode int
		wantErr  string
	}{
		{"malformed JSON", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":`, 400, apiv1.CodeBadRequest},
		{"unknown field", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":"` + tok.Secret + `","csr":"AA==","hostname":"h","admin":true}`, 400, apiv1.CodeBadRequest},
		{"trailing data", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":"t","csr":"AA==","hostname":"h"} {}`, 400, apiv1.CodeBadRequest},
		{"missing CSR", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":"t","hostname":"h"}`, 400, apiv1.CodeBadRequest},
		{"bad base64", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":"t","csr":"!!","hostname":"h"}`, 400, apiv1.CodeBadRequest},
		{"garbage CSR", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":"` + tok.Secret + `","csr":"AAAA","hostname":"h"}`, 400, apiv1.CodeBadRequest},
		{"oversized body", e.rawClient(), "POST", apiv1.PathEnroll, `{"token":"` + strings.Repeat("a", apiv1.MaxBodyBytes) + `"}`, 413, apiv1.CodeTooLarge},
		{"negative TTL", adminHC, "POST", apiv1.PathTokens, `{"ttl_seconds":-5}`, 400, apiv1.CodeBadRequest},
		{"TTL too long", adminHC, "POST", apiv1.PathTokens, `{"ttl_seconds":99999999}`, 400, apiv1.CodeBadRequest},
		{"retire non-number", adminHC, "POST", apiv1.PathKDKs + "/one/retire", ``, 400, apiv1.CodeBadRequest},
		{"objects bad filter", adminHC, "GET", apiv1.PathObjects + "?kdk_version=x", ``, 400, apiv1.CodeBadRequest},
		{"audit bad n", adminHC, "GET", apiv1.PathAudit + "?n=-1", ``, 400, apiv1.CodeBadRequest},
		{"policy wrong type", adminHC, "PUT", apiv1.PathPolicy, `{"tpm_required":"yes"}`, 400, apiv1.CodeBadRequest},
		{"empty backup passphrase", adminHC, "POST", apiv1.PathBackup, `{"passphrase":""}`, 400, apiv1.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, eb, _ := e.do(t, tc.hc, tc.method, tc.path, tc.body)
			if code != tc.wantCode || eb.Code != tc.wantErr {
				t.Fatalf("%s %s = %d %q (%s), want %d %q", tc.method, tc.path, code, eb.Code, eb.Error, tc.wantCode, tc.wantErr)
			}
		})
	}
	// The garbage-CSR enrollment was refused before the token was spent.
	if _, err := client.Join(context.Background(), client.JoinRequest{URL: e.srv.URL, Token: tok.Secret, CAHash: tok.CAHash, Hostname: "h", Key: newKey(t)}); err != nil {
		t.Fatalf("token spent by a refused request: %v", err)
	}
}
