package provider_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/test/logbuf"
	"path/filepath"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 11, 28, 8, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// env is one provider over a store, with its log captured.
type env struct {
	p     *provider.Provider
	st    store.Store
	rk    *rootkey.Key
	clock *clock
	logs  *logbuf.Buffer
}

func open(t testing.TB, st store.Store, rk *rootkey.Key, c *clock, opts ...func(*provider.Config)) *env {
	t.Helper()
	logs := &logbuf.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := provider.Config{Store: st, RootKey: rk, Log: log, Now: c.Now}
	provider.CheapBackups(&cfg)
	for _, o := range opts {
		o(&cfg)
	}
	p, err := provider.Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return &env{p: p, st: st, rk: rk, clock: c, logs: logs}
}

// caHash is Provider.CAHash, failing the test on an error.
func (e *env) caHash(t testing.TB) string {
	t.Helper()
	h, err := e.p.CAHash(context.Background())
	if err != nil {
		t.Fatalf("CAHash: %v", err)
	}
	return h
}

// newEnv opens a provider over a fresh in-memory store with a fresh root key.
func newEnv(t testing.TB, opts ...func(*provider.Config)) *env {
	t.Helper()
	return open(t, mem.New(), mustKey(t), newClock(), opts...)
}

// initEnv is newEnv plus Init.
func initEnv(t testing.TB, pol provider.Policy, opts ...func(*provider.Config)) *env {
	t.Helper()
	e := newEnv(t, opts...)
	if _, err := e.p.Init(context.Background(), provider.InitOptions{Policy: pol}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return e
}

// mustKey is a fresh root key.
func mustKey(t testing.TB) *rootkey.Key {
	t.Helper()
	k, err := rootkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// initOn opens a provider over st with a fresh root key and clock, and inits it.
func initOn(t testing.TB, st store.Store) *env {
	t.Helper()
	e := open(t, st, mustKey(t), newClock())
	if _, err := e.p.Init(context.Background(), provider.InitOptions{}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return e
}

// replicas are two providers over sa and sb (two handles on one store, or one handle
// twice), with one root key and one clock, as replicas behind a load balancer; a ran
// Init.
func replicas(t testing.TB, sa, sb store.Store) (a, b *env) {
	t.Helper()
	a = initOn(t, sa)
	return a, open(t, sb, a.rk, a.clock)
}

// openBolt is a bbolt store in a new file, closed at the end of the test.
func openBolt(t testing.TB) store.Store {
	t.Helper()
	s, err := boltstore.Open(filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// backup takes a backup, confirms it and returns the archive.
func (e *env) backup(t testing.TB, pass string) []byte {
	t.Helper()
	var buf bytes.Buffer
	info, err := e.p.Backup(context.Background(), &buf, []byte(pass))
	if err != nil {
		t.Fatalf("Backup: %v", err)
	}
	if _, err := e.p.ConfirmBackup(context.Background(), info.SHA256); err != nil {
		t.Fatalf("ConfirmBackup: %v", err)
	}
	return buf.Bytes()
}

// host is a joining host's key and CSR.
type host struct {
	key  *ecdsa.PrivateKey
	csr  []byte
	id   string
	cert *x509.Certificate
}

func newHost(t testing.TB) *host {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "kvm"}}, k)
	if err != nil {
		t.Fatal(err)
	}
	return &host{key: k, csr: csr}
}

// enroll creates a token and enrolls a new host with ek (nil: no TPM).
func (e *env) enroll(t testing.TB, name string, ek []byte) *host {
	t.Helper()
	ctx := context.Background()
	tok, err := e.p.CreateToken(ctx, time.Hour)
	if err != nil {
		t.Fatalf("CreateToken: %v", err)
	}
	h := newHost(t)
	resp, err := e.p.Enroll(ctx, provider.EnrollRequest{Token: tok.Secret, CSR: h.csr, Hostname: name, EKPublic: ek})
	if err != nil {
		t.Fatalf("Enroll %s: %v", name, err)
	}
	h.id = resp.HostID
	if h.cert, err = x509.ParseCertificate(resp.Certificate); err != nil {
		t.Fatal(err)
	}
	return h
}

// assertNoSecret fails if the logs contain key in raw, hex or base64 form.
func assertNoSecret(t testing.TB, logs string, key []byte) {
	t.Helper()
	for _, form := range []string{string(key), hex.EncodeToString(key), base64.StdEncoding.EncodeToString(key), base64.RawURLEncoding.EncodeToString(key)} {
		if bytes.Contains([]byte(logs), []byte(form)) {
			t.Fatalf("a key appears in the log output")
		}
	}
}

func discardLog() *slog.Logger { return slog.New(slog.DiscardHandler) }
