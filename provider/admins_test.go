package provider_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
)

// issueAdmin issues an admin certificate named name and returns it parsed.
func (e *env) issueAdmin(t testing.TB, name string) *x509.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, k)
	if err != nil {
		t.Fatal(err)
	}
	der, err := e.p.IssueAdminCert(context.Background(), csr)
	if err != nil {
		t.Fatalf("IssueAdminCert %s: %v", name, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAdminRevocation(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	other := open(t, e.st, e.rk, e.clock) // a second replica on the same store
	alice := e.issueAdmin(t, "alice")
	bob := e.issueAdmin(t, "bob")
	bob2 := e.issueAdmin(t, "bob") // bob's second workstation
	serial := func(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

	admins, err := e.p.Admins(ctx)
	byName := map[string]int{}
	for _, a := range admins {
		byName[a.Name]++
		if a.NotAfter.IsZero() || a.Issued.IsZero() || !a.Revoked.IsZero() || (a.Name == "alice" && a.Serial != serial(alice)) {
			t.Fatalf("Admins: %+v", a)
		}
	}
	if err != nil || len(admins) != 3 || byName["alice"] != 1 || byName["bob"] != 2 {
		t.Fatalf("Admins = %+v, %v", admins, err)
	}
	for _, c := range []*x509.Certificate{alice, bob, bob2} {
		if err := other.p.AuthorizeAdmin(ctx, c); err != nil {
			t.Fatalf("AuthorizeAdmin(%s) before any revocation: %v", c.Subject.CommonName, err)
		}
	}

	steps := []struct {
		ref         string
		wantErr     error
		wantRevoked []string // serials revoked by this step
	}{
		{ref: "bob", wantRevoked: []string{serial(bob), serial(bob2)}},
		{ref: "bob"}, // again: nothing left to revoke, not an error
		{ref: "alice", wantErr: provider.ErrLastAdmin},
		{ref: serial(alice), wantErr: provider.ErrLastAdmin},
		{ref: "carol", wantErr: provider.ErrNotFound},
		{ref: "", wantErr: provider.ErrBadRequest},
		{ref: "0badc0de", wantRevoked: []string{"0badc0de"}}, // a serial issued before the record existed
	}
	for _, st := range steps {
		got, err := e.p.RevokeAdmin(ctx, st.ref)
		if !errors.Is(err, st.wantErr) || (st.wantErr == nil) != (err == nil) {
			t.Fatalf("RevokeAdmin(%q) = %v, want %v", st.ref, err, st.wantErr)
		}
		if len(got) != len(st.wantRevoked) {
			t.Fatalf("RevokeAdmin(%q) revoked %+v, want serials %v", st.ref, got, st.wantRevoked)
		}
		want := strings.Join(st.wantRevoked, " ")
		for _, a := range got {
			if !strings.Contains(want, a.Serial) || a.Revoked.IsZero() {
				t.Fatalf("RevokeAdmin(%q) = %+v, want serials %s revoked", st.ref, got, want)
			}
		}
	}
	// Refused at once on the other replica; alice still works there.
	for _, c := range []*x509.Certificate{bob, bob2} {
		err := other.p.AuthorizeAdmin(ctx, c)
		if !errors.Is(err, provider.ErrAdminRevoked) || !strings.Contains(err.Error(), "bob") || !strings.Contains(err.Error(), serial(c)) {
			t.Fatalf("AuthorizeAdmin(revoked bob) on the other replica = %v, want ErrAdminRevoked naming bob and the serial", err)
		}
	}
	if err := other.p.AuthorizeAdmin(ctx, alice); err != nil {
		t.Fatalf("alice after bob's revocation: %v", err)
	}
	recs, err := e.p.Audit(ctx, 3)
	if err != nil || recs[0].Kind != audit.KindAdminRevoke || recs[0].Details["name"] != "bob" || recs[2].Subject != "0badc0de" {
		t.Fatalf("audit tail = %+v, %v; want admin_revoke records", recs, err)
	}

	// A backup carries the revocations; a restore keeps them.
	archive := e.backup(t, "pw: correct horse battery")
	dst := newEnv(t)
	if _, err := dst.p.Restore(ctx, bytes.NewReader(archive), []byte("pw: correct horse battery"), false); err != nil {
		t.Fatal(err)
	}
	if err := dst.p.AuthorizeAdmin(ctx, bob); !errors.Is(err, provider.ErrAdminRevoked) {
		t.Fatalf("bob after restore: %v, want ErrAdminRevoked", err)
	}
	if err := dst.p.AuthorizeAdmin(ctx, alice); err != nil {
		t.Fatalf("alice after restore: %v", err)
	}
	if got, err := dst.p.Admins(ctx); err != nil || len(got) != 4 {
		t.Fatalf("Admins after restore = %+v, %v; want the 4 records", got, err)
	}
}

// TestClientCertificatesVerifiedOnce: AuthorizeHost and AuthorizeAdmin are the one place a
// client certificate's chain is checked (the HTTP edge hands certificates over
// unverified), so each refuses certificates of another provider, of the other role and
// outside their validity, with the errors the edge maps to 401 and 403.
func TestClientCertificatesVerifiedOnce(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	foreign := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm", nil)
	alice := e.issueAdmin(t, "alice")
	mallory := foreign.issueAdmin(t, "mallory")
	fh := foreign.enroll(t, "kvm-foreign", nil)
	asAdmin := func(c *x509.Certificate) error { return e.p.AuthorizeAdmin(ctx, c) }
	asHost := func(c *x509.Certificate) error { _, err := e.p.AuthorizeHost(ctx, c); return err }
	tests := []struct {
		name      string
		authorize func(*x509.Certificate) error
		cert      *x509.Certificate
		wantErr   error // nil: accepted
	}{
		{"admin", asAdmin, alice, nil},
		{"host", asHost, h.cert, nil},
		{"admin of another provider", asAdmin, mallory, ca.ErrNotIssued},
		{"host of another provider", asHost, fh.cert, ca.ErrNotIssued},
		{"host certificate as admin", asAdmin, h.cert, ca.ErrWrongRole},
		{"admin certificate as host", asHost, alice, ca.ErrWrongRole},
		{"no admin certificate", asAdmin, nil, ca.ErrNotIssued},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for range 2 { // the second call is answered from the verification cache
				err := tc.authorize(tc.cert)
				if (tc.wantErr == nil) != (err == nil) || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
					t.Fatalf("authorize = %v, want %v", err, tc.wantErr)
				}
			}
		})
	}
	// The cache does not outlive a certificate.
	e.clock.Advance(alice.NotAfter.Sub(e.clock.Now()) + time.Minute)
	if err := e.p.AuthorizeAdmin(ctx, alice); !errors.Is(err, ca.ErrNotIssued) {
		t.Fatalf("expired admin certificate (verified before): %v, want ca.ErrNotIssued", err)
	}
}
