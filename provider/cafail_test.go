package provider_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

// failStore is a real store whose reads and writes fail with an injected error while one
// is set.
type failStore struct {
	store.Store
	fail atomic.Pointer[error]
}

func (s *failStore) err() error {
	if e := s.fail.Load(); e != nil {
		return *e
	}
	return nil
}

func (s *failStore) View(ctx context.Context, fn func(store.Tx) error) error {
	if err := s.err(); err != nil {
		return err
	}
	return s.Store.View(ctx, fn)
}

func (s *failStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	if err := s.err(); err != nil {
		return err
	}
	return s.Store.Update(ctx, fn)
}

// TestCAStoreFailure: CA and CAHash read the store under the caller's context and report
// its failure; they never hand out a nil certificate or an empty pin as if all were well
// (x509.CertPool.AddCert(nil) panics in the caller).
func TestCAStoreFailure(t *testing.T) {
	ctx := context.Background()
	rk, err := rootkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	st := &failStore{Store: mem.New()}
	e := open(t, st, rk, newClock())
	if _, err := e.p.Init(ctx, provider.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	if c, err := e.p.CA(ctx); c == nil || err != nil {
		t.Fatalf("CA = %v, %v", c, err)
	}
	injected := errors.New("injected: store unreachable")
	st.fail.Store(&injected)
	if c, err := e.p.CA(ctx); c != nil || !errors.Is(err, injected) {
		t.Fatalf("CA with a failing store = %v, %v; want nil and the store's error", c, err)
	}
	if h, err := e.p.CAHash(ctx); h != "" || !errors.Is(err, injected) {
		t.Fatalf("CAHash with a failing store = %q, %v; want \"\" and the store's error", h, err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	st.fail.Store(nil)
	if _, err := e.p.CA(cancelled); !errors.Is(err, context.Canceled) {
		t.Fatalf("CA with a cancelled context = %v, want context.Canceled", err)
	}
}
