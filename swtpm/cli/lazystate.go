package cli

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nkp-dev/nkp/swtpm/state"
)

// incomingLockWait bounds how long the first state access of an incoming migration
// waits for the source to release the state directory (swtpm: LOCK_STORAGE 300×10 ms).
const incomingLockWait = 3 * time.Second

// lazyDir is the state directory of an incoming migration (--migration incoming): it
// is opened, and so locked, only when the TPM first touches its state (CMD_INIT after
// the blobs arrived) or on LOCK_STORAGE, because on shared storage the migration source
// holds the lock until it hands over its savestate blob. It implements the NVRAM of
// libtpms and the Store and StorageLocker of the server by delegating to the opened
// *state.Dir.
type lazyDir struct {
	ctx  context.Context
	dir  string
	opts state.Options
	// open opens the store at dir; nil means state.Open (the directory backend).
	open func(string, state.Options) (stateStore, error)

	mu sync.Mutex // guards d
	d  stateStore
}

// stateStore is what serve needs of an open state: *state.Dir or *state.Linear.
type stateStore interface {
	Load(name string) ([]byte, error)
	Store(name string, data []byte) error
	Delete(name string) error
	LockStorage(ctx context.Context, retries int) error
	ReleaseLock() error
	Close() error
}

// get opens the directory on first use, waiting up to incomingLockWait for the lock.
func (l *lazyDir) get() (stateStore, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d != nil {
		return l.d, nil
	}
	return l.openLocked(int(incomingLockWait / (10 * time.Millisecond)))
}

func (l *lazyDir) openLocked(retries int) (stateStore, error) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	open := l.open
	if open == nil {
		open = func(dir string, o state.Options) (stateStore, error) { return state.Open(dir, o) }
	}
	for i := 0; ; i++ {
		d, err := open(l.dir, l.opts)
		if err == nil {
			l.d = d
			return d, nil
		}
		if !errors.Is(err, state.ErrLocked) || i >= retries {
			return nil, fmt.Errorf("--migration incoming: %w", err)
		}
		select {
		case <-l.ctx.Done():
			return nil, fmt.Errorf("--migration incoming: waiting for the state lock: %w", l.ctx.Err())
		case <-t.C:
		}
	}
}

// Load implements libtpms.NVRAM.
func (l *lazyDir) Load(name string) ([]byte, error) {
	d, err := l.get()
	if err != nil {
		return nil, err
	}
	return d.Load(name)
}

// Store implements libtpms.NVRAM and swtpm.Store.
func (l *lazyDir) Store(name string, data []byte) error {
	d, err := l.get()
	if err != nil {
		return err
	}
	return d.Store(name, data)
}

// Delete implements libtpms.NVRAM and swtpm.Store.
func (l *lazyDir) Delete(name string) error {
	d, err := l.get()
	if err != nil {
		return err
	}
	return d.Delete(name)
}

// LockStorage implements swtpm.StorageLocker: it opens the directory if needed.
func (l *lazyDir) LockStorage(ctx context.Context, retries int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d == nil {
		_, err := l.openLocked(retries)
		return err
	}
	return l.d.LockStorage(ctx, retries)
}

// ReleaseLock implements swtpm.StorageLocker.
func (l *lazyDir) ReleaseLock() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d == nil {
		return nil
	}
	return l.d.ReleaseLock()
}

// Close closes the directory if it was opened.
func (l *lazyDir) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d == nil {
		return nil
	}
	return l.d.Close()
}
