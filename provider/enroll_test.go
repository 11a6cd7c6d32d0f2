package provider_test

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider"
)

func TestEnrollRefusals(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	used, err := e.p.CreateToken(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e.enrollWith(t, used.Secret)
	expired, err := e.p.CreateToken(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	fresh, err := e.p.CreateToken(ctx, 2*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(time.Minute) // expiry is exclusive: at Expires the token is refused
	other := initEnv(t, provider.Policy{})
	foreign, err := other.p.CreateToken(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	good := newHost(t)
	tests := []struct {
		name string
		req  provider.EnrollRequest
		want error
	}{
		{"reused token", provider.EnrollRequest{Token: used.Secret, CSR: good.csr, Hostname: "h"}, provider.ErrTokenUsed},
		{"expired token", provider.EnrollRequest{Token: expired.Secret, CSR: good.csr, Hostname: "h"}, provider.ErrTokenExpired},
		{"wrong secret", provider.EnrollRequest{Token: fresh.ID + ".AAAA", CSR: good.csr, Hostname: "h"}, provider.ErrTokenInvalid},
		{"token of another provider", provider.EnrollRequest{Token: foreign.Secret, CSR: good.csr, Hostname: "h"}, provider.ErrTokenInvalid},
		{"no dot", provider.EnrollRequest{Token: "garbage", CSR: good.csr, Hostname: "h"}, provider.ErrTokenInvalid},
		{"empty token", provider.EnrollRequest{CSR: good.csr, Hostname: "h"}, provider.ErrTokenInvalid},
		{"bad CSR", provider.EnrollRequest{Token: fresh.Secret, CSR: []byte("x"), Hostname: "h"}, provider.ErrBadRequest},
		{"no hostname", provider.EnrollRequest{Token: fresh.Secret, CSR: good.csr}, provider.ErrBadRequest},
		{"hostname with newline", provider.EnrollRequest{Token: fresh.Secret, CSR: good.csr, Hostname: "a\nb"}, provider.ErrBadRequest},
		{"garbage EK", provider.EnrollRequest{Token: fresh.Secret, CSR: good.csr, Hostname: "h", EKPublic: []byte{0, 1, 2}}, provider.ErrBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.p.Enroll(ctx, tt.req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Enroll: %v, want %v", err, tt.want)
			}
		})
	}
	// None of the refusals consumed the fresh token.
	e.enrollWith(t, fresh.Secret)
	if _, err := e.p.CreateToken(ctx, -time.Second); !errors.Is(err, provider.ErrBadRequest) {
		t.Fatalf("negative ttl: %v", err)
	}
	if _, err := e.p.CreateToken(ctx, 30*24*time.Hour); !errors.Is(err, provider.ErrBadRequest) {
		t.Fatalf("ttl beyond the maximum: %v", err)
	}
	if strings.Contains(e.logs.String(), strings.SplitN(fresh.Secret, ".", 2)[1]) {
		t.Fatal("a token secret appears in the log")
	}
	recs, err := e.p.Audit(ctx, 50)
	if err != nil {
		t.Fatal(err)
	}
	refusals := 0
	for _, r := range recs {
		if r.Kind == "enroll_refused" {
			refusals++
		}
	}
	if refusals != 2 { // reused and expired; not the wrong or unknown secrets anyone can send
		t.Fatalf("%d enroll_refused audit records, want 2", refusals)
	}
}

func (e *env) enrollWith(t *testing.T, secret string) {
	t.Helper()
	h := newHost(t)
	if _, err := e.p.Enroll(context.Background(), provider.EnrollRequest{Token: secret, CSR: h.csr, Hostname: "kvm"}); err != nil {
		t.Fatalf("Enroll: %v", err)
	}
}

func TestAuthorizeHost(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	good := e.enroll(t, "good", nil)
	revoked := e.enroll(t, "revoked", nil)
	if err := e.p.Revoke(ctx, revoked.id); err != nil {
		t.Fatal(err)
	}
	other := initEnv(t, provider.Policy{})
	foreign := other.enroll(t, "foreign", nil)
	adminDER, err := e.p.IssueAdminCert(ctx, newHost(t).csr)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := x509.ParseCertificate(adminDER)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cert *x509.Certificate
		want error
	}{
		{"enrolled host", good.cert, nil},
		{"revoked host", revoked.cert, provider.ErrHostRevoked},
		{"certificate from another provider's CA", foreign.cert, provider.ErrHostUnknown},
		{"admin certificate", admin, provider.ErrHostUnknown},
		{"no certificate", nil, provider.ErrHostUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.p.AuthorizeHost(ctx, tt.cert)
			if !errors.Is(err, tt.want) {
				t.Fatalf("AuthorizeHost: %v, want %v", err, tt.want)
			}
		})
	}
	e.clock.Advance(provider.DefaultHostCertValidity + time.Hour)
	if _, err := e.p.AuthorizeHost(ctx, good.cert); !errors.Is(err, provider.ErrHostUnknown) {
		t.Fatalf("expired certificate: %v, want ErrHostUnknown", err)
	}
	e.backup(t, "p: correct horse battery")
	for _, id := range []string{uuid.NewString(), "", "../x"} {
		if _, err := e.p.Release(ctx, id); !errors.Is(err, provider.ErrHostUnknown) {
			t.Fatalf("release to unknown host %q: %v, want ErrHostUnknown", id, err)
		}
		if err := e.p.Revoke(ctx, id); !errors.Is(err, provider.ErrHostUnknown) {
			t.Fatalf("revoke of unknown host %q: %v, want ErrHostUnknown", id, err)
		}
	}
}

func TestIssueServerCert(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	der, err := e.p.IssueServerCert(ctx, newHost(t).csr, []string{"provider.example", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	caCert, err := e.p.CA(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pool.AddCert(caCert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: "127.0.0.1", CurrentTime: e.clock.Now()}); err != nil {
		t.Fatalf("server certificate does not verify for 127.0.0.1: %v", err)
	}
	if _, err := e.p.IssueServerCert(ctx, newHost(t).csr, nil); !errors.Is(err, provider.ErrBadRequest) {
		t.Fatalf("no names: %v, want ErrBadRequest", err)
	}
}

// TestTokenRace: one token presented by many hosts at once enrolls exactly one.
func TestTokenRace(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	tok, err := e.p.CreateToken(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	const n = 10
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		h := newHost(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.p.Enroll(ctx, provider.EnrollRequest{Token: tok.Secret, CSR: h.csr, Hostname: "racer"})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	ok := 0
	for err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, provider.ErrTokenUsed):
			t.Errorf("loser: %v, want ErrTokenUsed", err)
		}
	}
	if hosts, _ := e.p.Hosts(ctx); ok != 1 || len(hosts) != 1 {
		t.Fatalf("%d enrollments succeeded and %d hosts exist, want 1 and 1", ok, len(hosts))
	}
}

// TestTokenErrorsSayOneThing: a token whose ID was never issued and a real token ID with
// a wrong secret are refused with the same sentence, so a caller cannot probe which IDs
// exist.
func TestTokenErrorsSayOneThing(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	real, err := e.p.CreateToken(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	unknown := uuid.NewString()
	h := newHost(t)
	msg := func(token, id string) string {
		_, err := e.p.Enroll(ctx, provider.EnrollRequest{Token: token, CSR: h.csr, Hostname: "h"})
		if !errors.Is(err, provider.ErrTokenInvalid) {
			t.Fatalf("Enroll with %q: %v, want ErrTokenInvalid", token, err)
		}
		return strings.ReplaceAll(err.Error(), id, "ID")
	}
	wrongSecret := msg(real.ID+".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", real.ID)
	neverIssued := msg(unknown+".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", unknown)
	if wrongSecret != neverIssued {
		t.Fatalf("the refusals differ:\n wrong secret: %s\n never issued: %s", wrongSecret, neverIssued)
	}
	if !strings.Contains(wrongSecret, "token create") {
		t.Fatalf("refusal %q does not say the way out", wrongSecret)
	}
}
