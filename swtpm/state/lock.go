package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// ErrLocked: another process (nkp-swtpm or swtpm) holds the directory's lock.
var ErrLocked = errors.New("another process holds the state directory's lock")

// ErrLockReleased: Store or Delete while the Dir does not hold its lock: after
// ReleaseLock (on shared storage the migration's destination owns the files now) or
// before the first LockStorage of a Dir opened with DeferLock. LockStorage takes it.
var ErrLockReleased = errors.New("the state directory's lock is not held (released for an outgoing migration, or deferred for an incoming one); writes are refused until LOCK_STORAGE takes it")

// lockFile is swtpm's lock file name: the same file, locked with fcntl, so that nkp-swtpm
// and swtpm exclude each other.
const lockFile = ".lock"

// lockDir opens <dir>/.lock, creating it with mode (the state files' mode, as swtpm
// does), and takes a write lock on it. The lock is an open-file-description lock
// (F_OFD_SETLK): it conflicts with swtpm's classic fcntl locks and, unlike them, also
// with a second Open in the same process. An existing .lock keeps its mode.
func lockDir(dir string, mode os.FileMode) (*os.File, error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if err == nil {
		err = f.Chmod(mode) // the umask may have narrowed it
	} else if errors.Is(err, os.ErrExist) {
		f, err = os.OpenFile(path, os.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("state directory %s: open lock file: %w", dir, err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		f.Close()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("state directory %s is in use: %w (%s%s); stop the nkp-swtpm or swtpm that uses it, or give this one its own directory",
				dir, ErrLocked, path, holder(path))
		}
		return nil, fmt.Errorf("state directory %s: lock %s: %w", dir, path, err)
	}
	return f, nil
}

// holder names the pid holding a classic fcntl lock on path, when the kernel tells
// (it does not for open-file-description locks).
func holder(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(f.Fd(), unix.F_GETLK, &lk); err != nil || lk.Type == unix.F_UNLCK || lk.Pid <= 0 {
		return ""
	}
	return fmt.Sprintf(", held by pid %d", lk.Pid)
}

// ReleaseLock gives up the directory lock while the Dir stays open, for shared-storage
// migration (swtpm's --migration release-lock-outgoing: the destination takes the lock).
// Until LockStorage takes it again, Store and Delete fail with ErrLockReleased, so this
// process cannot overwrite what the destination writes (an auto-shutdown at exit, say).
func (d *Dir) ReleaseLock() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lock == nil {
		return nil
	}
	err := d.lock.Close()
	d.lock = nil
	clear(d.known) // the destination may write the files now
	clear(d.slots)
	if err != nil {
		return fmt.Errorf("state directory %s: release lock: %w", d.dir, err)
	}
	return nil
}

// LockStorage takes the directory lock after ReleaseLock or DeferLock (control command
// LOCK_STORAGE, or the first command of an incoming migration): it tries retries+1
// times, 10 ms apart, and stops early when ctx ends. It succeeds at once when the lock
// is held.
func (d *Dir) LockStorage(ctx context.Context, retries int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("state directory %s: closed", d.dir)
	}
	if d.lock != nil {
		return nil
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for i := 0; ; i++ {
		f, err := lockDir(d.dir, d.mode)
		if err == nil {
			d.lock = f
			d.applyModeLocked()
			// The other side (shared storage) may have made the state ID meanwhile.
			id, err := readStateID(d.dir)
			if err != nil {
				return err
			}
			if id != nil {
				d.stateID = id
			}
			return nil
		}
		if !errors.Is(err, ErrLocked) || i >= retries {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("state directory %s: waiting for the lock: %w", d.dir, ctx.Err())
		case <-t.C:
		}
	}
}
