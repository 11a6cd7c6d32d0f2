package provider_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

// TestConcurrentReleases runs releases from many goroutines at once (they are grouped
// into shared transactions) and checks every one succeeded, got the same keys and left
// exactly one audit record.
func TestConcurrentReleases(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
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
	ctx := context.Background()
	e := initEnv(b, provider.Policy{})
	h := e.enroll(b, "kvm", nil)
	e.backup(b, "p: correct horse battery")
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.p.Release(ctx, h.id); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// gatedStore holds every Update at the gate while it is closed, to keep a batch of
// releases committing for as long as a test needs.
type gatedStore struct {
	store.Store
	mu      sync.Mutex
	gate    chan struct{} // nil: open
	entered chan struct{} // receives once per Update held
}

func (s *gatedStore) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gate, s.entered = make(chan struct{}), make(chan struct{}, 16)
}

func (s *gatedStore) open() {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.gate)
	s.gate = nil
}

func (s *gatedStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	s.mu.Lock()
	gate, entered := s.gate, s.entered
	s.mu.Unlock()
	if gate != nil {
		entered <- struct{}{}
		<-gate
	}
	return s.Store.Update(ctx, fn)
}

// TestReleaseWaiterHonoursContext: a release waiting for its turn behind a batch that is
// committing returns as soon as its context ends, is not recorded, and leaves the queue
// working for the next release.
func TestReleaseWaiterHonoursContext(t *testing.T) {
	ctx := context.Background()
	st := &gatedStore{Store: mem.New()}
	e := initOn(t, st)
	leader, waiter := e.enroll(t, "kvm-lead", nil), e.enroll(t, "kvm-wait", nil)
	e.backup(t, "p: correct horse battery")
	before, _ := e.p.Audit(ctx, 1)

	st.close()
	led := make(chan error, 1)
	go func() { _, err := e.p.Release(ctx, leader.id); led <- err }()
	select {
	case <-st.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the leading release did not reach the store within 10 s")
	}
	wctx, cancel := context.WithCancel(ctx)
	waited := make(chan error, 1)
	go func() { _, err := e.p.Release(wctx, waiter.id); waited <- err }()
	cancel()
	select {
	case err := <-waited:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("waiting release after its context ended: %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a waiting release did not return within 10 s of its context ending (the batch ahead is still committing)")
	}
	st.open()
	if err := <-led; err != nil {
		t.Fatalf("leading release: %v", err)
	}
	if _, err := e.p.Release(ctx, waiter.id); err != nil {
		t.Fatalf("release after a canceled waiter: %v", err)
	}
	recs, _ := e.p.Audit(ctx, 3)
	var subjects []string
	for _, r := range recs {
		if r.Seq > before[0].Seq {
			subjects = append(subjects, r.Subject)
		}
	}
	if want := []string{leader.id, waiter.id}; fmt.Sprint(subjects) != fmt.Sprint(want) {
		t.Fatalf("release records after the test: %v, want %v (the canceled one not recorded)", subjects, want)
	}
}

// TestEveryReleaseAudited: each release that hands out keys has its own audit record,
// written before the keys leave; refusals (revoked, tpm-required) apply at once.
func TestEveryReleaseAudited(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm-01", nil)
	e.backup(t, "p: correct horse battery")
	before, _ := e.p.Audit(ctx, 1)
	for range 3 {
		if _, err := e.p.Release(ctx, h.id); err != nil {
			t.Fatal(err)
		}
	}
	recs, _ := e.p.Audit(ctx, 3)
	for i, r := range recs {
		if r.Seq != before[0].Seq+uint64(i)+1 || r.Kind != audit.KindRelease || r.Subject != h.id || r.Details["kdk_versions"] != "1" {
			t.Fatalf("record %d after three releases: %+v, want a release of v1 to %s", i, r, h.id)
		}
	}
	if err := e.p.SetPolicy(ctx, provider.Policy{TPMRequired: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, provider.ErrTPMRequired) {
		t.Fatalf("bare release after tpm-required: %v, want ErrTPMRequired", err)
	}
	if err := e.p.Revoke(ctx, h.id); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("release to a revoked host: %v, want ErrHostRevoked", err)
	}
}
