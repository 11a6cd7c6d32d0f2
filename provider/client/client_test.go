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
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/api"
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
		case api.PathStatus:
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
	if !errors.As(err, &ae) || ae.Code != api.CodeNotBackedUp || ae.Status != 409 || !IsCode(err, api.CodeNotBackedUp) {
		t.Fatalf("Status = %v, want APIError not_backed_up", err)
	}
	if _, err := c.Hosts(context.Background()); !IsCode(err, api.CodeInternal) || !strings.Contains(err.Error(), "proxy error") {
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
