package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
)

func TestCAHash(t *testing.T) {
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	defer srv.Close()
	c := srv.Certificate()
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	if got, want := CAHash(c), "sha256:"+hex.EncodeToString(sum[:]); got != want {
		t.Fatalf("CAHash = %s, want %s", got, want)
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	defer srv.Close()
	cert := tls.Certificate{Certificate: [][]byte{{1}}}
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no CA", Config{URL: srv.URL, Certificate: cert}, "no CA"},
		{"no certificate", Config{URL: srv.URL, CA: srv.Certificate()}, "no client certificate"},
		{"http URL", Config{URL: "http://x:1", CA: srv.Certificate(), Certificate: cert}, "https://"},
		{"no host", Config{URL: "https://", CA: srv.Certificate(), Certificate: cert}, "https://"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New = %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// TestErrors: JSON error bodies become *APIError with their code; anything else becomes
// code internal with the start of the body; a server whose certificate does not chain to
// the configured CA is refused before any request is sent.
func TestErrors(t *testing.T) {
	var requests atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		switch r.URL.Path {
		case apiv1.PathStatus:
			w.WriteHeader(http.StatusConflict)
			w.Write([]byte(`{"error":"take a backup first","code":"not_backed_up"}`))
		default:
			w.WriteHeader(http.StatusBadGateway)
			w.Write([]byte(`<html>proxy error</html>`))
		}
	}))
	srv.StartTLS()
	defer srv.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert := tls.Certificate{Certificate: [][]byte{srv.Certificate().Raw}, PrivateKey: key}
	c, err := New(Config{URL: srv.URL, CA: srv.Certificate(), Certificate: cert})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Status(context.Background())
	var ae *APIError
	if !errors.As(err, &ae) || ae.Code != apiv1.CodeNotBackedUp || ae.Status != 409 || !IsCode(err, apiv1.CodeNotBackedUp) {
		t.Fatalf("Status = %v, want APIError not_backed_up", err)
	}
	if _, err := c.Hosts(context.Background()); !IsCode(err, apiv1.CodeInternal) || !strings.Contains(err.Error(), "proxy error") {
		t.Fatalf("Hosts = %v, want code internal quoting the body", err)
	}

	before := requests.Load()
	c2, err := New(Config{URL: srv.URL, CA: selfSigned(t), Certificate: cert})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.Status(context.Background()); err == nil || !strings.Contains(err.Error(), "does not chain") {
		t.Fatalf("Status against a server of another CA = %v", err)
	}
	if requests.Load() != before {
		t.Fatal("a request reached a server that failed verification")
	}
}

// selfSigned makes a CA certificate unrelated to httptest's (all httptest servers share one).
func selfSigned(t *testing.T) *x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestReplicaFailover: a replica that cannot be reached is skipped, the one that answered
// is tried first afterwards, and a refusal from a provider is not retried elsewhere.
func TestReplicaFailover(t *testing.T) {
	var hitsB, hitsC atomic.Int64
	answer := func(hits *atomic.Int64, code int) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			w.WriteHeader(code)
			if code == http.StatusOK {
				w.Write([]byte(`{"state":"Active"}`))
			} else {
				w.Write([]byte(`{"error":"host revoked","code":"host_revoked"}`))
			}
		}
	}
	// A broken replica: accepts TCP connections and closes them at once, counting them.
	var brokenAccepts atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			brokenAccepts.Add(1)
			conn.Close()
		}
	}()
	downURL := "https://" + ln.Addr().String()
	b := httptest.NewTLSServer(answer(&hitsB, http.StatusOK))
	defer b.Close()
	c := httptest.NewTLSServer(answer(&hitsC, http.StatusForbidden))
	defer c.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert := tls.Certificate{Certificate: [][]byte{b.Certificate().Raw}, PrivateKey: key}

	cl, err := New(Config{URL: downURL, Replicas: []string{b.URL}, CA: b.Certificate(), Certificate: cert})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for i := 0; i < 3; i++ {
		if st, err := cl.Status(context.Background()); err != nil || st.State != "Active" {
			t.Fatalf("status with the first replica down = %+v, %v", st, err)
		}
	}
	if hitsB.Load() != 3 || brokenAccepts.Load() != 1 {
		t.Fatalf("replica B answered %d times (want 3), the broken one was tried %d times (want 1: B is tried first once it answered)",
			hitsB.Load(), brokenAccepts.Load())
	}

	refusing, err := New(Config{URL: c.URL, Replicas: []string{b.URL}, CA: b.Certificate(), Certificate: cert})
	if err != nil {
		t.Fatal(err)
	}
	defer refusing.Close()
	before := hitsB.Load()
	if _, err := refusing.Status(context.Background()); !IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("status = %v, want the first replica's refusal", err)
	}
	if hitsB.Load() != before || hitsC.Load() != 1 {
		t.Fatalf("a refusal was retried on another replica (B %d→%d, C %d)", before, hitsB.Load(), hitsC.Load())
	}

	allDown, err := New(Config{URL: downURL, Replicas: []string{downURL}, CA: b.Certificate(), Certificate: cert})
	if err != nil {
		t.Fatal(err)
	}
	defer allDown.Close()
	if _, err := allDown.Status(context.Background()); err == nil || strings.Count(err.Error(), "is nkp-provider running") != 2 {
		t.Fatalf("status with every replica down = %v", err)
	}
}
