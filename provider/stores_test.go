package provider_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// TestReplicasOnEveryStore runs two replicas (one for bbolt, whose file has one writer)
// over each backend: concurrent releases from both, each recorded once in an intact
// audit chain, and a revocation on one replica refused at once on the other.
func TestReplicasOnEveryStore(t *testing.T) {
	tests := []struct {
		name string
		open func(t *testing.T) (a, b store.Store)
	}{
		{"mem", func(t *testing.T) (store.Store, store.Store) { s := mem.New(); return s, s }},
		{"bolt", func(t *testing.T) (store.Store, store.Store) { s := openBolt(t); return s, s }},
		{"etcd", func(t *testing.T) (store.Store, store.Store) {
			c := etcdtest.New(t, etcdtest.Config{})
			var out [2]store.Store
			for i := range out {
				s, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: c.Endpoints()})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				out[i] = s
			}
			return out[0], out[1]
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			sa, sb := tt.open(t)
			a, b := replicas(t, sa, sb)
			hosts := make([]*host, 4)
			for i := range hosts {
				hosts[i] = a.enroll(t, fmt.Sprintf("kvm-%d", i), nil)
			}
			a.backup(t, "p: correct horse battery")
			before, err := a.p.Audit(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			const perHost = 10
			var wg sync.WaitGroup
			errs := make(chan error, 2*len(hosts)*perHost)
			for _, r := range []*env{a, b} {
				for _, h := range hosts {
					for range perHost {
						wg.Add(1)
						go func() {
							defer wg.Done()
							if _, err := r.p.Release(ctx, h.id); err != nil {
								errs <- err
							}
						}()
					}
				}
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			after, err := b.p.Audit(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := after[0].Seq-before[0].Seq, uint64(2*len(hosts)*perHost); got != want {
				t.Fatalf("%d audit records for %d releases", got, want)
			}
			if err := b.p.AuditVerify(ctx); err != nil {
				t.Fatal(err)
			}
			if err := a.p.Revoke(ctx, hosts[0].id); err != nil {
				t.Fatal(err)
			}
			if _, err := b.p.AuthorizeHost(ctx, hosts[0].cert); !errors.Is(err, provider.ErrHostRevoked) {
				t.Fatalf("replica b after revoke on a: %v, want ErrHostRevoked", err)
			}
			if _, err := b.p.Release(ctx, hosts[1].id); err != nil {
				t.Fatalf("another host on replica b: %v", err)
			}
		})
	}
}

// TestStoreOfAnotherProvider opens a bbolt file made by one provider with another
// provider's root key: refused, and the file is left as it was.
func TestStoreOfAnotherProvider(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "provider.db")
	s, err := boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := open(t, s, mustKey(t), newClock())
	st, err := e.p.Init(ctx, provider.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := provider.Open(ctx, provider.Config{Store: s, RootKey: mustKey(t), Log: discardLog()}); !errors.Is(err, provider.ErrRootKeyMismatch) {
		t.Fatalf("Open with another root key: %v, want ErrRootKeyMismatch", err)
	}
	again := open(t, s, e.rk, e.clock)
	if got, err := again.p.Status(ctx); err != nil || got.ProviderID != st.ProviderID {
		t.Fatalf("the store changed after the refused open: %+v, %v", got, err)
	}
}

// TestBoltReadOnly opens an initialized bbolt file read-only: reads work, every write —
// a release included, since it cannot be audited — is refused.
func TestBoltReadOnly(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "provider.db")
	s, err := boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := open(t, s, mustKey(t), newClock())
	if _, err := e.p.Init(ctx, provider.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	h := e.enroll(t, "kvm", nil)
	e.backup(t, "p: correct horse battery")
	s.Close()

	ro, err := boltstore.Open(path, boltstore.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	r := open(t, ro, e.rk, e.clock)
	if st, err := r.p.Status(ctx); err != nil || st.Hosts != 1 {
		t.Fatalf("Status on a read-only store: %+v, %v", st, err)
	}
	if _, err := r.p.Release(ctx, h.id); !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("Release on a read-only store: %v, want ErrReadOnly", err)
	}
	if _, err := r.p.Rotate(ctx); !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("Rotate on a read-only store: %v, want ErrReadOnly", err)
	}
	ro.Close()

}
