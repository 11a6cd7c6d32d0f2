package provider_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
)

// TestConcurrentReleases runs releases from many goroutines at once (they are grouped
// into shared transactions) and checks every one succeeded, got the same keys and, with
// every release audited, left exactly one audit record.
func TestConcurrentReleases(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{}, strictAudit)
	hosts := make([]*host, 8)
	for i := range hosts {
		hosts[i] = e.enroll(t, fmt.Sprintf("kvm-%02d", i), nil)
	}
	revoked := e.enroll(t, "revoked", nil)
	if err := e.p.Revoke(ctx, revoked.id); err != nil {
		t.Fatal(err)
	}
	e.backup(t, "p: correct horse battery")
	ref, err := e.p.Release(ctx, hosts[0].id)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := e.p.Audit(ctx, 1)

	const perHost = 25
	var wg sync.WaitGroup
	errs := make(chan error, len(hosts)*perHost+perHost)
	for _, h := range hosts {
		for range perHost {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rel, err := e.p.Release(ctx, h.id)
				if err != nil {
					errs <- err
					return
				}
				if len(rel) != 1 || string(rel[0].Bare) != string(ref[0].Bare) {
					errs <- fmt.Errorf("host %s got other keys", h.id)
				}
			}()
		}
	}
	refused := make(chan error, perHost)
	for range perHost {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.p.Release(ctx, revoked.id)
			refused <- err
		}()
	}
	wg.Wait()
	close(errs)
	close(refused)
	for err := range errs {
		t.Error(err)
	}
	for err := range refused {
		if err == nil {
			t.Error("a revoked host got keys in a batch with others")
		}
	}
	after, _ := e.p.Audit(ctx, 1)
	if got, want := after[0].Seq-before[0].Seq, uint64(len(hosts)*perHost); got != want {
		t.Fatalf("%d audit records for %d releases", got, want)
	}
	recs, _ := e.p.Audit(ctx, len(hosts)*perHost)
	for _, r := range recs {
		if r.Kind != audit.KindRelease {
			t.Fatalf("record %d is %s, want release", r.Seq, r.Kind)
		}
	}
	if err := e.p.AuditVerify(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestReleaseCanceled checks a release whose context is already done returns its error.
func TestReleaseCanceled(t *testing.T) {
	e := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm", nil)
	e.backup(t, "p: correct horse battery")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.p.Release(ctx, h.id); err == nil {
		t.Fatal("release with a canceled context succeeded")
	}
}

func BenchmarkRelease(b *testing.B) {
	for _, bb := range []struct {
		name string
		opts []func(*provider.Config)
	}{{"audit-window", nil}, {"audit-every", []func(*provider.Config){strictAudit}}} {
		b.Run(bb.name, func(b *testing.B) { benchmarkRelease(b, bb.opts...) })
	}
}

func benchmarkRelease(b *testing.B, opts ...func(*provider.Config)) {
	ctx := context.Background()
	e := initEnv(b, provider.Policy{}, opts...)
	h := e.enroll(b, "kvm", nil)
	e.backup(b, "p")
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.p.Release(ctx, h.id); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestReleaseAuditWindow: repeats of the same release within the window are served
// without a record and counted in the next one; a revocation still applies at once, and
// new versions are recorded at once.
func TestReleaseAuditWindow(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm-01", nil)
	other := e.enroll(t, "kvm-02", nil)
	e.backup(t, "p: correct horse battery")
	count := func() map[string]int {
		recs, err := e.p.Audit(ctx, 1000)
		if err != nil {
			t.Fatal(err)
		}
		n := map[string]int{}
		for _, r := range recs {
			if r.Kind == audit.KindRelease {
				n[r.Subject]++
			}
		}
		return n
	}
	for range 10 {
		if _, err := e.p.Release(ctx, h.id); err != nil {
			t.Fatal(err)
		}
	}
	if n := count()[h.id]; n != 1 {
		t.Fatalf("%d release records for 10 releases within the window, want 1", n)
	}
	e.clock.Advance(provider.DefaultReleaseAuditWindow)
	if _, err := e.p.Release(ctx, h.id); err != nil {
		t.Fatal(err)
	}
	recs, _ := e.p.Audit(ctx, 1)
	if recs[0].Kind != audit.KindRelease || recs[0].Details["repeats_before"] != "9" {
		t.Fatalf("record after the window: %+v, want a release with repeats_before=9", recs[0])
	}
	// A new version is recorded at once (after its backup).
	if _, err := e.p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	e.backup(t, "p: correct horse battery")
	if _, err := e.p.Release(ctx, h.id); err != nil {
		t.Fatal(err)
	}
	if n := count()[h.id]; n != 3 {
		t.Fatalf("%d release records after a rotation, want 3", n)
	}
	// A revocation applies inside the window.
	if _, err := e.p.Release(ctx, other.id); err != nil {
		t.Fatal(err)
	}
	if err := e.p.Revoke(ctx, other.id); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Release(ctx, other.id); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("release to a host revoked inside the window: %v, want ErrHostRevoked", err)
	}
	// So does tpm-required.
	if err := e.p.SetPolicy(ctx, provider.Policy{TPMRequired: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, provider.ErrTPMRequired) {
		t.Fatalf("bare release inside the window after tpm-required: %v, want ErrTPMRequired", err)
	}
}
