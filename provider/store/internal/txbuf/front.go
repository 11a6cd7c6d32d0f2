package txbuf

import (
	"fmt"

	"github.com/nkp-dev/nkp/provider/store"
)

// Front is the part of a transaction that every backend shares: the checks against use
// after the transaction's function returned and against writes in a View, the name
// rules, and the write buffer that Put and Delete fill. A backend's transaction embeds it
// and adds Get and List over its own snapshot, consulting Pending and Buf first.
type Front struct {
	Where string  // names the store in errors ("mem store", "store /var/lib/…")
	Buf   *Buffer // pending writes; nil in a View
	Done  bool    // set when the transaction's function returned
}

// CheckOpen fails once the transaction's function returned, and for a bad bucket name.
func (f *Front) CheckOpen(bucket string) error {
	if f.Done {
		return fmt.Errorf("%s: transaction used after its function returned", f.Where)
	}
	return CheckBucket(bucket)
}

// Check is CheckOpen for one key, and also refuses a write in a View.
func (f *Front) Check(bucket, key string, write bool) error {
	if f.Done {
		return fmt.Errorf("%s: transaction used after its function returned", f.Where)
	}
	if write && f.Buf == nil {
		return fmt.Errorf("%s: write to %s/%q in a View: %w (use Update)", f.Where, bucket, key, store.ErrReadOnly)
	}
	return CheckName(bucket, key)
}

// Pending reports what the transaction itself wrote to the key: ok is false when it
// wrote nothing there (the backend reads its snapshot), and err wraps store.ErrNotFound
// when it deleted the key.
func (f *Front) Pending(bucket, key string) (v []byte, ok bool, err error) {
	if f.Buf == nil {
		return nil, false, nil
	}
	v, deleted, ok := f.Buf.Lookup(bucket, key)
	if ok && deleted {
		return nil, true, fmt.Errorf("%s/%q: %w", bucket, key, store.ErrNotFound)
	}
	return v, ok, nil
}

// Put implements store.Tx.
func (f *Front) Put(bucket, key string, value []byte) error {
	if err := f.Check(bucket, key, true); err != nil {
		return err
	}
	f.Buf.Put(bucket, key, value)
	return nil
}

// Delete implements store.Tx.
func (f *Front) Delete(bucket, key string) error {
	if err := f.Check(bucket, key, true); err != nil {
		return err
	}
	f.Buf.Delete(bucket, key)
	return nil
}
