package provider_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
)

// TestRenewOnOtherReplica: a host enrolled on replica A renews its certificate (new key)
// on replica B; the new certificate works on both replicas, the old one until the new one
// is first used, then never again; the renewal is audited; a revoked host cannot renew.
func TestRenewOnOtherReplica(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	p := b.replicas(t)
	dirA, dirB, a, bb := p.dirA, p.dirB, p.a, p.b
	b.backUp(t, dirA, a.url)

	h := b.mustJoin(t, a, "kvm-renew")
	oldOnA := h.c // the enrolled certificate, on A
	onB := h.clientFor(t, bb.url)
	newKey := newKey(t)
	cert, err := onB.Renew(ctx, newKey)
	if err != nil {
		t.Fatalf("renew on B: %v", err)
	}
	if cert.Leaf.Subject.CommonName != h.id || !newKey.PublicKey.Equal(cert.Leaf.PublicKey) {
		t.Fatalf("renewed certificate names %q, want host %s with the new key", cert.Leaf.Subject.CommonName, h.id)
	}
	if !cert.Leaf.NotAfter.After(time.Now().Add(4 * 365 * 24 * time.Hour)) {
		t.Fatalf("renewed certificate ends %s, want about 5 years from now", cert.Leaf.NotAfter)
	}
	if _, err := oldOnA.Release(ctx); err != nil {
		t.Fatalf("the old certificate before the new one was used: %v", err)
	}
	if _, err := onB.Release(ctx); err != nil { // onB now presents the new certificate
		t.Fatalf("release on B with the renewed certificate: %v", err)
	}
	newOnA, err := client.New(client.Config{URL: a.url, CA: h.enr.CA, Certificate: cert, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(newOnA.Close)
	if _, err := newOnA.Release(ctx); err != nil {
		t.Fatalf("release on A with the certificate renewed on B: %v", err)
	}
	if _, err := oldOnA.Release(ctx); !client.IsCode(err, apiv1.CodeHostUnknown) {
		t.Fatalf("the old certificate after the new one was used: %v, want %s", err, apiv1.CodeHostUnknown)
	}
	var hosts []apiv1.Host
	b.ctlJSON(t, dirB, bb.url, &hosts, "hosts")
	if len(hosts) != 1 || !hosts[0].CertNotAfter.Equal(cert.Leaf.NotAfter) {
		t.Fatalf("hosts = %+v, want the renewed certificate's expiry %s", hosts, cert.Leaf.NotAfter)
	}
	out := b.mustCtl(t, dirA, a.url, "", "audit", "-n", "10")
	if !strings.Contains(out, "host_renew") || !strings.Contains(out, cert.Leaf.SerialNumber.Text(16)) {
		t.Fatalf("no host_renew record naming the new serial:\n%s", out)
	}

	b.mustCtl(t, dirB, bb.url, "", "revoke", h.id)
	if _, err := newOnA.Renew(ctx, newKey); !client.IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("renewal of a revoked host: %v, want %s", err, apiv1.CodeHostRevoked)
	}
	b.mustCtl(t, dirA, a.url, "", "audit", "verify")
}
