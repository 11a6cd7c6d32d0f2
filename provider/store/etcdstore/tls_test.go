package etcdstore_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// Over TLS with client certificates: the provider's certificate gets in, a client
// without one or without the CA does not.
func TestTLS(t *testing.T) {
	e2e.Require(t, etcdtest.Binary)
	c := etcdtest.New(t, etcdtest.Config{TLS: true})
	f := c.TLSFiles()
	ctx := context.Background()

	withCert, err := etcdstore.LoadTLS(f.CA, f.ClientCert, f.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	caOnly, err := etcdstore.LoadTLS(f.CA, "", "")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		cfg  etcdstore.Config
		ok   bool
	}{
		{"client certificate", etcdstore.Config{TLS: withCert}, true},
		{"no client certificate", etcdstore.Config{TLS: caOnly}, false},
		{"plain TCP", etcdstore.Config{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.Endpoints = c.Endpoints()
			cfg.DialTimeout = time.Second
			s, err := etcdstore.Open(ctx, cfg)
			if !tc.ok {
				if err == nil {
					err = s.Update(ctx, func(tx store.Tx) error { return tx.Put("b", "k", []byte("v")) })
					s.Close()
				}
				if err == nil {
					t.Fatal("etcd accepted a client it should refuse")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put("b", "k", []byte("v")) }); err != nil {
				t.Fatalf("write over TLS: %v", err)
			}
		})
	}
}

func TestLoadTLSErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	openKey := filepath.Join(dir, "key.pem")
	if err := os.WriteFile(openKey, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	goodCA := filepath.Join(dir, "good-ca.pem")
	if err := os.WriteFile(goodCA, selfSignedPEM(t), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name                string
		ca, cert, key, want string
	}{
		{"missing CA", filepath.Join(dir, "none.pem"), "", "", "no such file"},
		{"CA not PEM", notPEM, "", "", "no PEM certificate"},
		{"cert without key", goodCA, "c.pem", "", "give both"},
		{"key readable by others", goodCA, "c.pem", openKey, "chmod 600"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := etcdstore.LoadTLS(c.ca, c.cert, c.key)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("LoadTLS = %v, want an error saying %q", err, c.want)
			}
		})
	}
}

// selfSignedPEM returns a throwaway self-signed CA certificate in PEM.
func selfSignedPEM(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
