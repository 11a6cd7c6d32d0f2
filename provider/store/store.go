// Package store is the provider's persistent state: named buckets of keys and values with
// serialisable transactions. The provider package is its only user. Implementations:
// store/mem (unit tests), store/boltstore (one provider, a bbolt file) and store/etcdstore
// (several provider replicas sharing one etcd cluster).
//
// Values are opaque bytes; the provider encrypts what must not be read from the store
// (KDKs are sealed under the provider root key before they reach a Store).
//
// # The contract every implementation keeps (provider/store/storetest checks it)
//
//   - Names: a bucket is 1..64 bytes of [a-z0-9._-]; a key is 1..1024 bytes, any
//     bytes (the empty key is refused). Values may be empty; a stored empty value
//     reads back as present.
//   - Values are copied both ways: callers may keep and modify what Get and List
//     return and what they passed to Put. A transaction sees its own writes (Get and
//     List).
//   - List calls fn on the state at the List call, in bytewise key order; fn may Put
//     and Delete.
//   - Put and Delete in a View return an error wrapping ErrReadOnly. A cancelled ctx
//     returns an error wrapping ctx.Err() without running fn. After Close: ErrClosed.
//   - fn must not start another transaction on the same Store (mem and bbolt would
//     deadlock); a Tx must not be used after fn returns, nor from several goroutines.
//   - Prefetch(tx, Key(b, k), Range(b, prefix), ...) names what fn is about to read
//     (optional interface Prefetcher on a Tx): etcdstore reads it all in one etcd Txn
//     at the transaction's snapshot and serves later Gets and Lists inside it from that
//     copy; mem and bbolt ignore it. It is a hint: results are the same with or
//     without it (storetest's Prefetch tests), bad names are skipped (the Get reports
//     them), an Update still checks for conflicts exactly what fn read, and the
//     transaction's own writes win. Call it first in a transaction whose reads are
//     known (the provider's key fetch: meta, the host, the KDKs).
package store

import (
	"context"
	"errors"
)

// Errors every implementation returns, wrapped with context; check with errors.Is.
var (
	// ErrNotFound: the key is not in the bucket.
	ErrNotFound = errors.New("not found")
	// ErrConflict: another writer changed what the transaction read; Update retries it
	// internally a bounded number of times before returning this.
	ErrConflict = errors.New("transaction conflict")
	// ErrReadOnly: the store cannot be written (read-only file system, read-only open).
	ErrReadOnly = errors.New("store is read-only")
	// ErrFull: the store refused the write for lack of space or quota.
	ErrFull = errors.New("store is full")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store is closed")
)

// Store is a transactional key-value store with named buckets.
type Store interface {
	// View runs fn in a read-only transaction with a consistent snapshot.
	View(ctx context.Context, fn func(Tx) error) error
	// Update runs fn in a read-write transaction. The writes become visible atomically
	// when fn returns nil; nothing is written when fn returns an error. fn may run more
	// than once (etcd retries on conflict), so it must not have side effects outside tx.
	Update(ctx context.Context, fn func(Tx) error) error
	// Close releases the store. It is safe to call more than once.
	Close() error
}

// Tx is one transaction. Buckets exist implicitly; keys are compared bytewise.
type Tx interface {
	// Get returns the value, or an error wrapping ErrNotFound.
	Get(bucket, key string) ([]byte, error)
	// Put sets the value (Update only).
	Put(bucket, key string, value []byte) error
	// Delete removes the key; deleting a missing key is not an error (Update only).
	Delete(bucket, key string) error
	// List calls fn for each key in bucket that starts with prefix, in key order.
	// Returning an error from fn stops the walk and returns that error.
	List(bucket, prefix string, fn func(key string, value []byte) error) error
}

// Read names what a transaction is about to read, for Prefetch: the key Key of Bucket,
// or with Prefix every key of Bucket that starts with Key (Key may then be empty).
type Read struct {
	Bucket string
	Key    string
	Prefix bool
}

// Key is the Read of one key.
func Key(bucket, key string) Read { return Read{Bucket: bucket, Key: key} }

// Range is the Read of the keys of bucket that start with prefix ("" for all of them).
func Range(bucket, prefix string) Read { return Read{Bucket: bucket, Key: prefix, Prefix: true} }

// Prefetcher is implemented by the Tx of a backend that pays a network round trip per
// read (etcd). Prefetch reads every key and range named in one round trip, at the
// transaction's snapshot (fixing it if nothing was read yet, so the snapshot still holds
// every write committed before the transaction started), and the transaction's later
// Gets and Lists within what it read are served from that copy without another round
// trip. It is a hint: it changes no result, only the cost. A Read with a bad bucket or
// key name is skipped (the Get or List of it reports the error). Reads in an Update are
// checked for conflicts only when the function actually Gets or Lists them.
type Prefetcher interface {
	Prefetch(reads ...Read) error
}

// Prefetch tells tx what its function is about to read: a Tx that implements Prefetcher
// reads it all at once; for the others (mem, bbolt, whose reads are local) it does
// nothing. Call it first in a View or Update whose reads are known in advance.
func Prefetch(tx Tx, reads ...Read) error {
	if p, ok := tx.(Prefetcher); ok {
		return p.Prefetch(reads...)
	}
	return nil
}
