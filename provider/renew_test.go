package provider_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"testing"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
)

// TestRenewHost walks a host through renewals, on two replicas sharing a store: the
// renewed certificate has the same host ID; the one it replaces works until the new one
// is presented once; a retried renewal supersedes the unused certificate; a new key is
// accepted; a revoked host cannot renew.
func TestRenewHost(t *testing.T) {
	ctx := context.Background()
	a := initEnv(t, provider.Policy{})
	b := open(t, a.st, a.rk, a.clock) // replica B
	h := a.enroll(t, "kvm-01", nil)
	certs := map[string]*x509.Certificate{"c1": h.cert}
	renew := func(on *env, with string, key *ecdsa.PrivateKey) (*x509.Certificate, error) {
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := on.p.RenewHost(ctx, certs[with], csr)
		if err != nil {
			return nil, err
		}
		c, err := x509.ParseCertificate(resp.Certificate)
		if err != nil {
			t.Fatal(err)
		}
		if resp.HostID != h.id || c.Subject.CommonName != h.id {
			t.Fatalf("renewed certificate for %q (response %q), want host %s", c.Subject.CommonName, resp.HostID, h.id)
		}
		return c, nil
	}
	newKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name    string
		on      *env
		renew   string // renew with this certificate into the next cN; "" = only check
		key     *ecdsa.PrivateKey
		accept  []string // then accepted, in this order (presenting a current one retires the old)
		refuse  []string // then refused with ErrHostUnknown
		wantErr error
	}{
		{name: "renew on A with the enrolled cert", on: a, renew: "c1", key: h.key, accept: []string{"c1", "c1"}},
		{name: "the new cert on B retires c1", on: b, accept: []string{"c2"}, refuse: []string{"c1"}},
		{name: "renew on B, response lost", on: b, renew: "c2", key: h.key},
		{name: "retry with c2 on A", on: a, renew: "c2", key: newKey, accept: []string{"c2", "c4"}, refuse: []string{"c3", "c2"}},
		{name: "c2 cannot renew any more", on: b, renew: "c2", key: h.key, wantErr: provider.ErrHostUnknown},
	}
	next := 2
	for _, st := range steps {
		if st.renew != "" {
			c, err := renew(st.on, st.renew, st.key)
			if !errors.Is(err, st.wantErr) || (err == nil) != (st.wantErr == nil) {
				t.Fatalf("%s: RenewHost = %v, want %v", st.name, err, st.wantErr)
			}
			if err == nil {
				certs["c"+string(rune('0'+next))] = c
				next++
			}
		}
		for _, n := range st.accept {
			if _, err := st.on.p.AuthorizeHost(ctx, certs[n]); err != nil {
				t.Fatalf("%s: AuthorizeHost(%s) = %v, want accepted", st.name, n, err)
			}
		}
		for _, n := range st.refuse {
			if _, err := st.on.p.AuthorizeHost(ctx, certs[n]); !errors.Is(err, provider.ErrHostUnknown) {
				t.Fatalf("%s: AuthorizeHost(%s) = %v, want ErrHostUnknown", st.name, n, err)
			}
		}
	}
	if !newKey.PublicKey.Equal(certs["c4"].PublicKey) {
		t.Fatal("c4 is not for the new key")
	}
	hosts, err := b.p.Hosts(ctx)
	if err != nil || len(hosts) != 1 || hosts[0].CertSerial != certs["c4"].SerialNumber.Text(16) {
		t.Fatalf("Hosts = %+v, %v; want the current serial to be c4's", hosts, err)
	}
	recs, err := a.p.Audit(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	renewals := 0
	for _, r := range recs {
		if r.Kind == audit.KindHostRenew && r.Subject == h.id && r.Actor == "host:"+h.id && r.Details["cert_serial"] != "" {
			renewals++
		}
	}
	if renewals != 3 {
		t.Fatalf("%d host_renew records, want 3: %+v", renewals, recs)
	}
	if _, err := a.p.RenewHost(ctx, certs["c4"], []byte("not a CSR")); !errors.Is(err, provider.ErrBadRequest) {
		t.Fatalf("RenewHost with a bad CSR: %v, want ErrBadRequest", err)
	}
	if err := a.p.Revoke(ctx, h.id); err != nil {
		t.Fatal(err)
	}
	if _, err := renew(b, "c4", newKey); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("RenewHost of a revoked host: %v, want ErrHostRevoked", err)
	}
}
