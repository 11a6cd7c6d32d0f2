// Package boltstore is the provider's default store.Store: one bbolt file, mode 0600,
// used by one provider process at a time (bbolt holds an exclusive file lock; a second
// process waits Options.LockTimeout and then gets a clear error).
//
// Each store bucket is a top-level bbolt bucket. bbolt gives serialisable transactions
// natively (one writer, MVCC readers), so Update never returns store.ErrConflict.
//
// Commits are fsynced, and concurrent Updates share them (group commit): one writer
// goroutine runs every Update waiting at that moment, one after the other, in one bbolt
// transaction, each over a write buffer of its own so that a function that fails (or
// panics: the panic is raised again in its caller) leaves nothing. A failed commit runs
// the batch's functions again one by one, so one caller's failure (a full disk hit by
// its large write) is not another's.
//
// Errors map to the store's sentinels: a read-only open or file system gives
// store.ErrReadOnly, a full disk or Options.MaxSize gives store.ErrFull, and a failed
// commit writes nothing.
//
// A transaction's function must not start another transaction on the same Store: an
// Update inside an Update waits for the writer that runs it, and a remap of the file
// (past 256 MiB) waits for open read transactions.
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

// maxBatch bounds how many Updates share one commit.
const maxBatch = 128

// Store is a store.Store over one bbolt file.
type Store struct {
	path   string
	db     *bolt.DB
	calls  chan *call    // Updates for the writer goroutine
	writer chan struct{} // closed when the writer goroutine has ended

	gate txbuf.Gate // admits transactions until Close
}

// call is one Update waiting for the writer.
type call struct {
	ctx      context.Context
	fn       func(store.Tx) error
	err      error
	panicked any // what fn panicked with; Update panics with it in the caller
	done     chan struct{}
}

// errPanicked stands for a call whose fn panicked; nothing of it is written.
var errPanicked = errors.New("transaction function panicked")

// run calls c.fn, turning a panic into errPanicked (kept in c.panicked).
func (c *call) run(t *tx) (err error) {
	defer func() {
		if p := recover(); p != nil {
			c.panicked = p
			err = errPanicked
		}
	}()
	return c.fn(t)
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
	st := &Store{path: path, db: db}
	if !opts.ReadOnly {
		st.calls = make(chan *call)
		st.writer = make(chan struct{})
		go st.write()
	}
	return st, nil
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
	return s.gate.Enter(ctx, "store "+s.path, op)
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
	t := &tx{Front: txbuf.Front{Where: "store " + s.path}, btx: btx}
	defer func() { t.Done = true }()
	return fn(t)
}

// Update implements store.Store.
func (s *Store) Update(ctx context.Context, fn func(store.Tx) error) error {
	done, err := s.begin(ctx, "update")
	if err != nil {
		return err
	}
	defer done()
	if s.calls == nil {
		return fmt.Errorf("store %s: update: %w (opened read-only)", s.path, store.ErrReadOnly)
	}
	c := &call{ctx: ctx, fn: fn, done: make(chan struct{})}
	select {
	case s.calls <- c:
	case <-ctx.Done():
		return fmt.Errorf("store %s: update: %w", s.path, ctx.Err())
	}
	<-c.done // fn may be running: wait for it even if ctx ends
	if c.panicked != nil {
		panic(c.panicked) // in the caller's goroutine, where it belongs
	}
	return c.err
}

// write is the writer goroutine: it takes every waiting Update (up to maxBatch) and
// commits them together, until Close closes s.calls.
func (s *Store) write() {
	defer close(s.writer)
	for c := range s.calls {
		batch := []*call{c}
	drain:
		for len(batch) < maxBatch {
			select {
			case c, ok := <-s.calls:
				if !ok {
					break drain
				}
				batch = append(batch, c)
			default:
				break drain
			}
		}
		s.runBatch(batch)
		for _, c := range batch {
			close(c.done)
		}
	}
}

// runBatch runs the calls in one bbolt transaction and sets each call's err. When the
// transaction as a whole fails, each call that had succeeded runs again alone.
func (s *Store) runBatch(batch []*call) {
	btx, err := s.db.Begin(true)
	if err != nil {
		err = fmt.Errorf("store %s: update: %w", s.path, mapErr(err))
		for _, c := range batch {
			c.err = err
		}
		return
	}
	var ran, unrun []*call
	var failed error
	for i, c := range batch {
		if err := c.ctx.Err(); err != nil {
			c.err = fmt.Errorf("store %s: update: %w", s.path, err)
			continue
		}
		t := &tx{Front: txbuf.Front{Where: "store " + s.path, Buf: txbuf.New()}, btx: btx}
		err := c.run(t)
		t.Done = true
		if err != nil {
			c.err = err // its buffer is dropped: nothing of it reaches the file
			continue
		}
		ran = append(ran, c)
		if err := t.apply(); err != nil {
			failed = err
			unrun = batch[i+1:]
			break
		}
	}
	if failed == nil && len(ran) > 0 {
		if err := btx.Commit(); err != nil {
			failed = fmt.Errorf("store %s: commit: %w", s.path, mapErr(err))
		}
	} else {
		_ = btx.Rollback()
	}
	if failed == nil {
		return
	}
	if len(batch) == 1 {
		batch[0].err = failed
		return
	}
	// Nothing of this batch reached the file: run again, alone, every call that had
	// succeeded and every call the failure kept from running.
	for _, c := range append(ran, unrun...) {
		s.runBatch([]*call{c})
	}
}

// Close implements store.Store; it waits for running transactions.
func (s *Store) Close() error {
	return s.gate.Close(func() error {
		if s.calls != nil {
			close(s.calls) // no Update is running: they are inside the gate
			<-s.writer
		}
		if err := s.db.Close(); err != nil {
			return fmt.Errorf("store %s: close: %w", s.path, err)
		}
		return nil
	})
}

// tx is a transaction over btx. In an Update, buf holds its writes until the writer
// applies them (the batch's bbolt transaction is shared with other Updates).
type tx struct {
	txbuf.Front
	btx *bolt.Tx
}

func (t *tx) Get(bucket, key string) ([]byte, error) {
	if err := t.Check(bucket, key, false); err != nil {
		return nil, err
	}
	if v, ok, err := t.Pending(bucket, key); ok {
		return v, err
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

// apply writes the buffer into the bbolt transaction.
func (t *tx) apply() error {
	for _, name := range t.Buf.Buckets() {
		b, err := t.btx.CreateBucketIfNotExists([]byte(name))
		if err != nil {
			return fmt.Errorf("%s: bucket %s: %w", t.Where, name, mapErr(err))
		}
		err = t.Buf.Each(name, func(key string, value []byte, deleted bool) error {
			var err error
			if deleted {
				err = b.Delete([]byte(key))
			} else {
				// bbolt keeps the slice until commit; the buffer's copy is not reused.
				err = b.Put([]byte(key), value)
			}
			if err != nil {
				return fmt.Errorf("%s: write %s/%q: %w", t.Where, name, key, mapErr(err))
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func (t *tx) List(bucket, prefix string, fn func(key string, value []byte) error) error {
	if err := t.CheckOpen(bucket); err != nil {
		return err
	}
	// Collect first: fn may write, and the walk shows the state at the List call.
	var kvs []txbuf.KV
	if b := t.btx.Bucket([]byte(bucket)); b != nil {
		c := b.Cursor()
		p := []byte(prefix)
		for k, v := c.Seek(p); k != nil && len(k) >= len(p) && string(k[:len(p)]) == prefix; k, v = c.Next() {
			if v == nil && b.Bucket(k) != nil {
				continue // a nested bucket: not ours
			}
			kvs = append(kvs, txbuf.KV{Key: string(k), Value: txbuf.Clone(v)})
		}
	}
	if t.Buf != nil {
		kvs = t.Buf.Merge(bucket, prefix, kvs)
	}
	for _, kv := range kvs {
		if err := fn(kv.Key, kv.Value); err != nil {
			return err
		}
	}
	return nil
}
