// Package txbuf holds what the store backends share: the rules for bucket and key names,
// and the write buffer of a read-write transaction (its pending puts and deletes, merged
// over what the backend reads so that a transaction sees its own writes).
//
// Only the packages under provider/store import it.
package txbuf

import (
	"fmt"
	"sort"
	"strings"
)

// MaxBucketLen bounds bucket names; MaxKeyLen bounds keys. Both are far above what the
// provider uses and keep every backend's own limits out of reach.
const (
	MaxBucketLen = 64
	MaxKeyLen    = 1024
)

// CheckName reports whether bucket and key are acceptable to every backend: a bucket is
// 1..64 bytes of [a-z0-9._-]; a key is 1..1024 bytes, any bytes.
func CheckName(bucket, key string) error {
	if err := CheckBucket(bucket); err != nil {
		return err
	}
	if key == "" {
		return fmt.Errorf("bucket %q: empty key: keys must have at least one byte", bucket)
	}
	if len(key) > MaxKeyLen {
		return fmt.Errorf("bucket %q: key of %d bytes is longer than the limit of %d", bucket, len(key), MaxKeyLen)
	}
	return nil
}

// CheckBucket reports whether bucket is 1..64 bytes of [a-z0-9._-].
func CheckBucket(bucket string) error {
	if bucket == "" || len(bucket) > MaxBucketLen {
		return fmt.Errorf("bucket name %q: must be 1 to %d bytes of [a-z0-9._-]", bucket, MaxBucketLen)
	}
	for i := 0; i < len(bucket); i++ {
		c := bucket[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("bucket name %q: byte %q at %d is not in [a-z0-9._-]", bucket, c, i)
		}
	}
	return nil
}

// Clone returns a copy of b that never aliases it; nil becomes an empty, non-nil slice so
// that a stored empty value reads back as present.
func Clone(b []byte) []byte {
	out := make([]byte, len(b))
	copy(out, b)
	return out
}

// KV is one key and value of a bucket.
type KV struct {
	Key   string
	Value []byte
}

// entry is a pending write: a value, or a deletion when deleted is true.
type entry struct {
	value   []byte
	deleted bool
}

// Buffer holds a transaction's pending writes by bucket. The zero value is not usable;
// call New.
type Buffer struct {
	buckets map[string]map[string]entry
}

// New returns an empty Buffer.
func New() *Buffer { return &Buffer{buckets: make(map[string]map[string]entry)} }

func (b *Buffer) bucket(name string) map[string]entry {
	m := b.buckets[name]
	if m == nil {
		m = make(map[string]entry)
		b.buckets[name] = m
	}
	return m
}

// Put records a write of a copy of value.
func (b *Buffer) Put(bucket, key string, value []byte) {
	b.bucket(bucket)[key] = entry{value: Clone(value)}
}

// Delete records a deletion.
func (b *Buffer) Delete(bucket, key string) {
	b.bucket(bucket)[key] = entry{deleted: true}
}

// Lookup returns the pending value of key (a copy), whether the pending write is a
// deletion, and whether there is a pending write at all.
func (b *Buffer) Lookup(bucket, key string) (value []byte, deleted, ok bool) {
	e, ok := b.buckets[bucket][key]
	if !ok {
		return nil, false, false
	}
	if e.deleted {
		return nil, true, true
	}
	return Clone(e.value), false, true
}

// Empty reports whether nothing is pending.
func (b *Buffer) Empty() bool {
	for _, m := range b.buckets {
		if len(m) > 0 {
			return false
		}
	}
	return true
}

// Buckets returns the names of the buckets with pending writes, sorted.
func (b *Buffer) Buckets() []string {
	var names []string
	for name, m := range b.buckets {
		if len(m) > 0 {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// Each calls fn for each pending write of bucket in key order; value is nil for a
// deletion. fn must not keep value.
func (b *Buffer) Each(bucket string, fn func(key string, value []byte, deleted bool) error) error {
	m := b.buckets[bucket]
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		e := m[k]
		if err := fn(k, e.value, e.deleted); err != nil {
			return err
		}
	}
	return nil
}

// Merge returns base (the committed keys of bucket starting with prefix, in key order)
// with the pending writes of that bucket and prefix applied, in key order. The values
// returned are copies.
func (b *Buffer) Merge(bucket, prefix string, base []KV) []KV {
	m := b.buckets[bucket]
	var pending []string
	for k := range m {
		if strings.HasPrefix(k, prefix) {
			pending = append(pending, k)
		}
	}
	if len(pending) == 0 {
		return base
	}
	sort.Strings(pending)
	out := make([]KV, 0, len(base)+len(pending))
	i, j := 0, 0
	for i < len(base) || j < len(pending) {
		switch {
		case j == len(pending) || i < len(base) && base[i].Key < pending[j]:
			out = append(out, base[i])
			i++
		default:
			k := pending[j]
			if i < len(base) && base[i].Key == k {
				i++ // overridden by the pending write
			}
			if e := m[k]; !e.deleted {
				out = append(out, KV{Key: k, Value: Clone(e.value)})
			}
			j++
		}
	}
	return out
}
