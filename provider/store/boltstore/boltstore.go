// Package boltstore is the provider's default store.Store: one bbolt file, mode 0600,
// used by one provider process at a time (bbolt holds an exclusive file lock; a second
// process waits Options.LockTimeout and then gets a clear error).
//
// Each store bucket is a top-level bbolt bucket. bbolt gives serialisable transactions
// natively (one writer, MVCC readers), so Update never returns store.ErrConflict. Commits
// are fsynced. Errors map to the store's sentinels: a read-only open or file system gives
// store.ErrReadOnly, a full disk or Options.MaxSize gives store.ErrFull, and a failed
// commit writes nothing.
//
// A transaction's function must not start another transaction on the same Store: a
// remap of the file (past 256 MiB) waits for open read transactions.
//
// Only the provider's wiring (cmd/nkp-provider, tests) imports it.
package boltstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/internal/txbuf"
)

// FileMode is the mode of a new store file; an existing file with wider permissions is
// narrowed to it (with a warning in the log).
const FileMode fs.FileMode = 0o600

// initialMmapSize is the address space mapped at open; see Open.
const initialMmapSize = 256 << 20

// Options tune Open. The zero value is a read-write store without a size limit.
type Options struct {
	// ReadOnly opens the file without taking the write lock; every Update fails with
	// store.ErrReadOnly. Several read-only openers may share the file.
	ReadOnly bool
	// LockTimeout bounds the wait for the file lock held by another process; 0 means 2 s.
	LockTimeout time.Duration
	// MaxSize bounds the file in bytes; an Update that would grow it further fails with
	// store.ErrFull. 0 means no limit but the disk's.
	MaxSize int
	// Log receives warnings (permissions narrowed); nil discards them.
	Log *slog.Logger
}

// Store is a store.Store over one bbolt file.
type Store struct {
	path string
	db   *bolt.DB

	mu     sync.RWMutex // held for reading by transactions, for writing by Close
	closed bool         // guarded by mu
}

var _ store.Store = (*Store)(nil)

// Open opens or creates the store file at path. The directory must exist.
func Open(path string, opts Options) (*Store, error) {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = 2 * time.Second
	}
	if fi, err := os.Stat(path); err == nil {
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("store %s: not a regular file (%v); point the provider at a store file", path, fi.Mode().Type())
		}
		if perm := fi.Mode().Perm(); perm&^FileMode != 0 && !opts.ReadOnly {
			if err := os.Chmod(path, FileMode); err != nil {
				return nil, fmt.Errorf("store %s: mode %v is wider than %v and narrowing it failed: %w", path, perm, FileMode, mapErr(err))
			}
			log.Warn("store file permissions narrowed", "path", path, "was", perm.String(), "now", FileMode.String())
		}
	} else if opts.ReadOnly {
		return nil, fmt.Errorf("store %s: cannot open read-only: %w", path, err)
	}
	db, err := bolt.Open(path, FileMode, &bolt.Options{
		Timeout:      opts.LockTimeout,
		ReadOnly:     opts.ReadOnly,
		MaxSize:      opts.MaxSize,
		FreelistType: bolt.FreelistMapType,
		// bbolt remaps the file when it outgrows the map, and a remap waits for every
		// open read transaction. A large initial map (address space, not memory) keeps
		// writers from waiting on long Views until the store outgrows it.
		InitialMmapSize: initialMmapSize,
	})
	switch {
	case err == nil:
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("store %s: locked by another process for %v (is another nkp-provider running on it?): %w", path, opts.LockTimeout, err)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrChecksum):
		return nil, fmt.Errorf("store %s: not a bbolt store file or damaged (%w); restore the provider from a backup into a new file", path, err)
	default:
		return nil, fmt.Errorf("store %s: open: %w", path, mapErr(err))
	}
	return &Store{path: path, db: db}, nil
}

// Path returns the store file's path.
func (s *Store) Path() string { return s.path }

// mapErr adds the store sentinel that matches a bbolt or system error.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, berrors.ErrDatabaseReadOnly), errors.Is(err, syscall.EROFS), errors.Is(err, berrors.ErrTxNotWritable):
		return fmt.Errorf("%w: %w", store.ErrReadOnly, err)
	case errors.Is(err, berrors.ErrMaxSizeReached), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return fmt.Errorf("%w: %w (free space or raise the size limit)", store.ErrFull, err)
	case errors.Is(err, berrors.ErrDatabaseNotOpen):
		return fmt.Errorf("%w: %w", store.ErrClosed, err)
	}
	return err
}

func (s *Store) begin(ctx context.Context, op string) (func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("store %s: %s: %w", s.path, op, err)
	}
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return nil, fmt.Errorf("store %s: %s: %w", s.path, op, store.ErrClosed)
	}
	return s.mu.RUnlock, nil
}

// View implements store.Store.
func (s *Store) View(ctx context.Context, fn func(store.Tx) error) error {
	done, err := s.begin(ctx, "view")
	if err != nil {
		return err
	}
	defer done()
	btx, err := s.db.Begin(false)
	if err != nil {
		return fmt.Errorf("store %s: view: %w", s.path, mapErr(err))
	}
	defer btx.Rollback()
	t := &tx{btx: btx, path: s.path}
	defer func() { t.done = true }()
	return fn(t)
}

// Update implements store.Store.
func (s *Store) Update(ctx context.Context, fn func(store.Tx) error) error {
	done, err := s.begin(ctx, "update")
	if err != nil {
		return err
	}
	defer done()
	btx, err := s.db.Begin(true)
	if err != nil {
		return fmt.Errorf("store %s: update: %w", s.path, mapErr(err))
	}
	t := &tx{btx: btx, path: s.path, write: true}
	err = fn(t)
	t.done = true
	if err != nil {
		_ = btx.Rollback()
		return err
	}
	if err := btx.Commit(); err != nil {
		return fmt.Errorf("store %s: commit: %w", s.path, mapErr(err))
	}
	return nil
}

// Close implements store.Store; it waits for running transactions.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("store %s: close: %w", s.path, err)
	}
	return nil
}

type tx struct {
	btx   *bolt.Tx
	path  string
	write bool
	done  bool
}

func (t *tx) check(bucket, key string, write bool) error {
	if t.done {
		return fmt.Errorf("store %s: transaction used after its function returned", t.path)
	}
	if write && !t.write {
		return fmt.Errorf("store %s: write to %s/%q in a View: %w (use Update)", t.path, bucket, key, store.ErrReadOnly)
	}
	return txbuf.CheckName(bucket, key)
}

func (t *tx) Get(bucket, key string) ([]byte, error) {
	if err := t.check(bucket, key, false); err != nil {
		return nil, err
	}
	b := t.btx.Bucket([]byte(bucket))
	if b == nil {
		return nil, fmt.Errorf("%s/%q: %w", bucket, key, store.ErrNotFound)
	}
	v := b.Get([]byte(key))
	if v == nil {
		return nil, fmt.Errorf("%s/%q: %w", bucket, key, store.ErrNotFound)
	}
	return txbuf.Clone(v), nil
}

func (t *tx) Put(bucket, key string, value []byte) error {
	if err := t.check(bucket, key, true); err != nil {
		return err
	}
	b, err := t.btx.CreateBucketIfNotExists([]byte(bucket))
	if err != nil {
		return fmt.Errorf("store %s: bucket %s: %w", t.path, bucket, mapErr(err))
	}
	// bbolt keeps the slices until commit: hand it copies. A nil value would read back
	// as missing, so store an empty one.
	if err := b.Put([]byte(key), txbuf.Clone(value)); err != nil {
		return fmt.Errorf("store %s: put %s/%q: %w", t.path, bucket, key, mapErr(err))
	}
	return nil
}

func (t *tx) Delete(bucket, key string) error {
	if err := t.check(bucket, key, true); err != nil {
		return err
	}
	b := t.btx.Bucket([]byte(bucket))
	if b == nil {
		return nil
	}
	if err := b.Delete([]byte(key)); err != nil {
		return fmt.Errorf("store %s: delete %s/%q: %w", t.path, bucket, key, mapErr(err))
	}
	return nil
}

func (t *tx) List(bucket, prefix string, fn func(key string, value []byte) error) error {
	if t.done {
		return fmt.Errorf("store %s: transaction used after its function returned", t.path)
	}
	if err := txbuf.CheckBucket(bucket); err != nil {
		return err
	}
	b := t.btx.Bucket([]byte(bucket))
	if b == nil {
		return nil
	}
	// Collect first: fn may write to the bucket, which would upset a live cursor.
	var kvs []txbuf.KV
	c := b.Cursor()
	p := []byte(prefix)
	for k, v := c.Seek(p); k != nil && len(k) >= len(p) && string(k[:len(p)]) == prefix; k, v = c.Next() {
		if v == nil && b.Bucket(k) != nil {
			continue // a nested bucket: not ours
		}
		kvs = append(kvs, txbuf.KV{Key: string(k), Value: txbuf.Clone(v)})
	}
	for _, kv := range kvs {
		if err := fn(kv.Key, kv.Value); err != nil {
			return err
		}
	}
	return nil
}
