package storetest

import (
	"context"
	"sync/atomic"

	"github.com/nkp-dev/nkp/provider/store"
)

// FailStore is a real store with one fake part: while an error is injected (Inject),
// every transaction, View or Update, fails with it before reaching the store: a store
// that went away, filled up or timed out. Everything else is the wrapped store's.
type FailStore struct {
	store.Store
	fail atomic.Pointer[error]
}

// Inject makes every following transaction fail with err; Inject(nil) heals the store.
func (s *FailStore) Inject(err error) {
	if err == nil {
		s.fail.Store(nil)
		return
	}
	s.fail.Store(&err)
}

func (s *FailStore) err() error {
	if e := s.fail.Load(); e != nil {
		return *e
	}
	return nil
}

// View runs fn in the wrapped store's read transaction, or fails with the injected error.
func (s *FailStore) View(ctx context.Context, fn func(store.Tx) error) error {
	if err := s.err(); err != nil {
		return err
	}
	return s.Store.View(ctx, fn)
}

// Update runs fn in the wrapped store's write transaction, or fails with the injected
// error.
func (s *FailStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	if err := s.err(); err != nil {
		return err
	}
	return s.Store.Update(ctx, fn)
}
