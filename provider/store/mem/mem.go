// Package mem is an in-memory store.Store for unit tests of the provider: the same
// semantics as the bbolt and etcd backends (checked by the shared contract test in
// provider/store/storetest), nothing on disk, and switches that make it refuse writes as
// a read-only or full store would, so that callers can test those paths.
//
// Transactions are serialised: Update holds an exclusive lock and View a shared one for
// the whole of fn, so fn must not start another transaction on the same Store.
package mem

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/internal/txbuf"
)

// Store is an in-memory store.Store. The zero value is not usable; call New.
type Store struct {
	mu sync.RWMutex
	// Guarded by mu.
	data     map[string]map[string][]byte
	size     int // bytes of keys and values held
	quota    int // 0: unlimited
	readOnly bool
	closed   bool
}

// New returns an empty Store.
func New() *Store { return &Store{data: make(map[string]map[string][]byte)} }

var _ store.Store = (*Store)(nil)

// SetReadOnly makes every later Update fail with an error wrapping store.ErrReadOnly
// (true) or allows writes again (false).
func (s *Store) SetReadOnly(ro bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readOnly = ro
}

// SetQuota limits the bytes of keys and values the store holds; an Update that would go
// beyond it fails with an error wrapping store.ErrFull and writes nothing. 0 removes the
// limit.
func (s *Store) SetQuota(bytes int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.quota = bytes
}

// View implements store.Store.
func (s *Store) View(ctx context.Context, fn func(store.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mem store: view: %w", err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("mem store: view: %w", store.ErrClosed)
	}
	tx := &tx{Front: txbuf.Front{Where: "mem store"}, s: s}
	defer func() { tx.Done = true }()
	return fn(tx)
}

// Update implements store.Store.
func (s *Store) Update(ctx context.Context, fn func(store.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mem store: update: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("mem store: update: %w", store.ErrClosed)
	}
	if s.readOnly {
		return fmt.Errorf("mem store: update: %w (SetReadOnly(true) is in effect)", store.ErrReadOnly)
	}
	tx := &tx{Front: txbuf.Front{Where: "mem store", Buf: txbuf.New()}, s: s}
	err := fn(tx)
	tx.Done = true
	if err != nil {
		return err
	}
	return s.commitLocked(tx.Buf)
}

// commitLocked applies buf, or nothing when the quota would be exceeded.
func (s *Store) commitLocked(buf *txbuf.Buffer) error {
	size := s.size
	for _, b := range buf.Buckets() {
		_ = buf.Each(b, func(k string, v []byte, deleted bool) error {
			if old, ok := s.data[b][k]; ok {
				size -= len(k) + len(old)
			}
			if !deleted {
				size += len(k) + len(v)
			}
			return nil
		})
	}
	if s.quota > 0 && size > s.quota && size > s.size {
		return fmt.Errorf("mem store: commit: %w: %d bytes would exceed the quota of %d; delete data or raise the quota", store.ErrFull, size, s.quota)
	}
	for _, b := range buf.Buckets() {
		m := s.data[b]
		if m == nil {
			m = make(map[string][]byte)
			s.data[b] = m
		}
		_ = buf.Each(b, func(k string, v []byte, deleted bool) error {
			if deleted {
				delete(m, k)
			} else {
				m[k] = txbuf.Clone(v)
			}
			return nil
		})
	}
	s.size = size
	return nil
}

// Close implements store.Store. The data is dropped.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.data = nil
	return nil
}

// tx is a transaction; buf is nil in a View. The Store's lock is held while it is live.
type tx struct {
	txbuf.Front
	s *Store
}

func (t *tx) Get(bucket, key string) ([]byte, error) {
	if err := t.Check(bucket, key, false); err != nil {
		return nil, err
	}
	if v, ok, err := t.Pending(bucket, key); ok {
		return v, err
	}
	v, ok := t.s.data[bucket][key]
	if !ok {
		return nil, fmt.Errorf("%s/%q: %w", bucket, key, store.ErrNotFound)
	}
	return txbuf.Clone(v), nil
}

func (t *tx) List(bucket, prefix string, fn func(key string, value []byte) error) error {
	if err := t.CheckOpen(bucket); err != nil {
		return err
	}
	m := t.s.data[bucket]
	base := make([]txbuf.KV, 0, len(m))
	for k, v := range m {
		if strings.HasPrefix(k, prefix) {
			base = append(base, txbuf.KV{Key: k, Value: txbuf.Clone(v)})
		}
	}
	sort.Slice(base, func(i, j int) bool { return base[i].Key < base[j].Key })
	if t.Buf != nil {
		base = t.Buf.Merge(bucket, prefix, base)
	}
	for _, kv := range base {
		if err := fn(kv.Key, kv.Value); err != nil {
			return err
		}
	}
	return nil
}
