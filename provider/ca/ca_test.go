package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"strings"
	"testing"
	"time"
)

func csrFor(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "ignored"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func ecKey(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestIssueAndVerify(t *testing.T) {
	now := time.Date(2026, 11, 28, 8, 0, 0, 0, time.UTC)
	c, err := New("prov-1", now, 10*365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := c.MarshalKey()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := Parse(c.Certificate().Raw, keyDER)
	if err != nil {
		t.Fatal(err)
	}
	if c.Hash() != c2.Hash() || !strings.HasPrefix(c.Hash(), "sha256:") || len(c.Hash()) != 7+64 {
		t.Fatalf("hash %q vs %q", c.Hash(), c2.Hash())
	}
	other, err := New("prov-2", now, time.Hour*24)
	if err != nil {
		t.Fatal(err)
	}
	csr := csrFor(t, ecKey(t, elliptic.P256()))
	host, err := c2.IssueHost(csr, "host-1", now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := c.IssueAdmin(csr, "admin", now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	server, err := c.IssueServer(csr, []string{"localhost", "127.0.0.1"}, now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(server.Cert.IPAddresses) != 1 || len(server.Cert.DNSNames) != 1 {
		t.Fatalf("server cert SANs %v %v", server.Cert.DNSNames, server.Cert.IPAddresses)
	}
	foreign, err := other.IssueHost(csr, "host-1", now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cert    *x509.Certificate
		role    Role
		at      time.Time
		wantCN  string
		wantErr bool
	}{
		{"host", host.Cert, RoleHost, now, "host-1", false},
		{"host with skewed clock", host.Cert, RoleHost, now.Add(-ClockSkew / 2), "host-1", false},
		{"admin", admin.Cert, RoleAdmin, now, "admin", false},
		{"server", server.Cert, RoleServer, now, "localhost", false},
		{"host as admin", host.Cert, RoleAdmin, now, "", true},
		{"admin as host", admin.Cert, RoleHost, now, "", true},
		{"other CA", foreign.Cert, RoleHost, now, "", true},
		{"expired", host.Cert, RoleHost, now.Add(25 * time.Hour), "", true},
		{"nil", nil, RoleHost, now, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cn, err := c.Verify(tt.cert, tt.role, tt.at)
			if tt.wantErr {
				if !errors.Is(err, ErrNotIssued) {
					t.Fatalf("Verify: %v, want ErrNotIssued", err)
				}
				if wrongRole := strings.HasSuffix(tt.name, " as host") || strings.HasSuffix(tt.name, " as admin"); errors.Is(err, ErrWrongRole) != wrongRole {
					t.Fatalf("Verify: %v; ErrWrongRole = %v, want %v", err, errors.Is(err, ErrWrongRole), wrongRole)
				}
				return
			}
			if err != nil || cn != tt.wantCN {
				t.Fatalf("Verify = %q, %v; want %q", cn, err, tt.wantCN)
			}
		})
	}
}

func TestParseCSRRefuses(t *testing.T) {
	good := csrFor(t, ecKey(t, elliptic.P256()))
	tampered := append([]byte(nil), good...)
	tampered[len(tampered)-5] ^= 0xff
	rsaSmall, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		der  []byte
	}{
		{"empty", nil},
		{"garbage", []byte("not a csr")},
		{"bad signature", tampered},
		{"P-224", csrFor(t, ecKey(t, elliptic.P224()))},
		{"RSA 1024", csrFor(t, rsaSmall)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseCSR(tt.der); !errors.Is(err, ErrBadCSR) {
				t.Fatalf("ParseCSR: %v, want ErrBadCSR", err)
			}
		})
	}
	if _, err := ParseCSR(good); err != nil {
		t.Fatalf("good CSR: %v", err)
	}
}

func TestIsSerial(t *testing.T) {
	tests := []struct {
		s    string
		want bool
	}{
		{"", false},
		{"0", true},
		{"1f3a", true},
		{"1F3A", false},
		{"-1", false},
		{"0x1f", false},
		{" 1f", false},
		{strings.Repeat("f", 40), true},
		{strings.Repeat("f", 41), false},
		{"g", false},
	}
	for _, tt := range tests {
		if got := IsSerial(tt.s); got != tt.want {
			t.Errorf("IsSerial(%q) = %v, want %v", tt.s, got, tt.want)
		}
	}
}
