// Package etcdstore is the store.Store that lets two or more provider replicas share one
// state: every replica opens the same etcd cluster and key prefix.
//
// Layout: the value of key K in bucket B lives at etcd key <prefix>B/K. Bucket names
// cannot hold "/" (store name rules), so the layout is unambiguous; the empty user key,
// which the store forbids, gives each bucket a marker key <prefix>B/ that deletions bump.
//
// Transactions are serialisable by optimistic concurrency control:
//   - a transaction reads one snapshot: the revision of its first read, every later read
//     at that revision (etcd MVCC);
//   - Update buffers its writes and records what it read: the mod revision of each key
//     it got (0 for a missing key) and each bucket it listed;
//   - at commit one etcd Txn compares every key read with its recorded mod revision and
//     every listed bucket's range (marker included) with "nothing modified after the
//     snapshot", and applies the writes only when all comparisons hold;
//   - otherwise, or when the snapshot was compacted away, fn runs again on a new
//     snapshot, up to Config.MaxAttempts times, and then Update returns an error wrapping
//     store.ErrConflict.
//
// Each read is one etcd round trip, unless the transaction read it already (a key Got, a
// range Listed) or named it first with store.Prefetch: then the keys and ranges named are
// read in one etcd Txn of Range operations, linearizable like any read, and served from
// that copy (the provider's key fetch is one round trip this way).
//
// etcd limits one Txn to --max-txn-ops operations (128 by default) and one request to
// --max-request-bytes (1.5 MiB by default). A provider restore writes every host, KDK and
// catalog entry in one transaction, so run etcd with --max-txn-ops 16384 and
// --max-request-bytes 16777216 (test/etcdtest does); an Update beyond the limits fails
// with an error naming the flag. A full etcd (NOSPACE alarm, --quota-backend-bytes)
// gives store.ErrFull.
//
// Only the provider's wiring (cmd/nkp-provider, tests) imports it.
//
// etcd over plain http exposes host records and sealed KDKs to the network:
// production deployments run etcd with client TLS and pass LoadTLS's result
// (nkp-provider init|serve and nkpctl provider init|restore take --etcd-cacert,
// --etcd-cert and --etcd-key; https:// endpoints without --etcd-cacert are refused
// naming the flag). With Config.Log set, the etcd client's own warnings and errors
// land there (component=etcd-client).
//
// Update retries conflicts itself and returns store.ErrConflict only after
// MaxAttempts; retries run one at a time within a process, so a hot key (the audit
// head) degrades to serial commits instead of giving up. A commit that times out has
// an unknown outcome: the error says so and it is not retried.
package etcdstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/internal/txbuf"
)

// DefaultPrefix is the etcd key prefix when Config.Prefix is empty.
const DefaultPrefix = "/nkp/provider/"

// Config describes the etcd cluster and how to use it.
type Config struct {
	// Endpoints of the etcd cluster, e.g. "http://10.0.0.1:2379". Required for Open.
	Endpoints []string
	// Prefix under which the provider's keys live; "" means DefaultPrefix. Replicas of
	// one provider use the same prefix; it must end with "/".
	Prefix string
	// TLS for the etcd client connection; nil means plain (loopback or trusted network).
	TLS *tls.Config
	// DialTimeout bounds Open's first contact; 0 means 5 s.
	DialTimeout time.Duration
	// RequestTimeout bounds each etcd request inside a transaction; 0 means 5 s.
	RequestTimeout time.Duration
	// MaxAttempts bounds how often Update runs fn when other writers conflict; 0 means 16.
	MaxAttempts int
	// Log receives conflict retries at debug level, and the etcd client's own warnings
	// and errors (component=etcd-client); nil discards them.
	Log *slog.Logger

	userLog *slog.Logger // Log as given, before defaults
}

func (c *Config) defaults() error {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(c.Prefix, "/") {
		return fmt.Errorf("etcd store: prefix %q must end with \"/\"", c.Prefix)
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 5 * time.Second
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 16
	}
	c.userLog = c.Log
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Store is a store.Store over etcd.
type Store struct {
	cli     *clientv3.Client
	ownsCli bool
	cfg     Config
	where   string // for messages: "etcd store <endpoints><prefix>"

	gate txbuf.Gate // admits transactions until Close

	// order makes a retry run alone in this process: first attempts hold it for
	// reading, retries for writing, so retriers stop colliding with each other and with
	// newcomers on a hot key (the audit log's head), leaving only other replicas to race.
	order sync.RWMutex
}

var (
	_ store.Store      = (*Store)(nil)
	_ store.Prefetcher = (*tx)(nil)
)

// Open connects to the cluster in cfg.Endpoints and checks that it answers within
// cfg.DialTimeout. Close closes the connection.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcd store: no endpoints; pass --etcd-endpoints http://HOST:2379[,...]")
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         cfg.TLS,
		Logger:      zapToSlog(cfg.userLog),
		Context:     context.WithoutCancel(ctx),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd store %v: client: %w", cfg.Endpoints, err)
	}
	s := newStore(cli, cfg)
	s.ownsCli = true
	pctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	if _, err := cli.Get(pctx, cfg.Prefix, clientv3.WithCountOnly()); err != nil {
		cli.Close()
		return nil, fmt.Errorf("%s: not answering within %v (is etcd running at those endpoints?): %w", s.where, cfg.DialTimeout, err)
	}
	return s, nil
}

// New returns a Store over an existing client, which Close leaves open.
func New(cli *clientv3.Client, cfg Config) (*Store, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	return newStore(cli, cfg), nil
}

func newStore(cli *clientv3.Client, cfg Config) *Store {
	return &Store{cli: cli, cfg: cfg, where: fmt.Sprintf("etcd store %s%s", strings.Join(cli.Endpoints(), ","), cfg.Prefix)}
}

func (s *Store) begin(ctx context.Context, op string) (func(), error) {
	return s.gate.Enter(ctx, s.where, op)
}

// View implements store.Store.
func (s *Store) View(ctx context.Context, fn func(store.Tx) error) error {
	done, err := s.begin(ctx, "view")
	if err != nil {
		return err
	}
	defer done()
	for attempt := 1; ; attempt++ {
		t := &tx{Front: txbuf.Front{Where: s.where}, s: s, ctx: ctx}
		err := fn(t)
		t.Done = true
		if t.restart == nil || attempt >= s.cfg.MaxAttempts {
			return err
		}
		if werr := s.backoff(ctx, attempt); werr != nil {
			return werr
		}
	}
}

// Update implements store.Store.
func (s *Store) Update(ctx context.Context, fn func(store.Tx) error) error {
	done, err := s.begin(ctx, "update")
	if err != nil {
		return err
	}
	defer done()
	for attempt := 1; attempt <= s.cfg.MaxAttempts; attempt++ {
		committed, err := s.attempt(ctx, fn, attempt)
		if err != nil || committed {
			return err
		}
		s.cfg.Log.Debug("etcd store: transaction conflict, retrying", "attempt", attempt)
		if err := s.backoff(ctx, attempt); err != nil {
			return err
		}
	}
	return fmt.Errorf("%s: update: %w: other writers changed what it read %d times in a row; try again", s.where, store.ErrConflict, s.cfg.MaxAttempts)
}

// attempt runs fn once and commits it; false without error means it must run again.
func (s *Store) attempt(ctx context.Context, fn func(store.Tx) error, attempt int) (bool, error) {
	if attempt == 1 {
		s.order.RLock()
		defer s.order.RUnlock()
	} else {
		s.order.Lock()
		defer s.order.Unlock()
	}
	t := &tx{Front: txbuf.Front{Where: s.where, Buf: txbuf.New()}, s: s, ctx: ctx, reads: map[string]int64{}, ranges: map[string]bool{}}
	err := fn(t)
	t.Done = true
	if t.restart != nil {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return t.commit()
}

// backoff waits a short random time growing with attempt, or until ctx ends.
func (s *Store) backoff(ctx context.Context, attempt int) error {
	ceiling := time.Millisecond << min(attempt, 6) // 2 ms .. 64 ms
	d := ceiling/2 + rand.N(ceiling/2)
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return fmt.Errorf("%s: update: %w", s.where, ctx.Err())
	case <-timer.C:
		return nil
	}
}

// Close implements store.Store; it waits for running transactions.
func (s *Store) Close() error {
	return s.gate.Close(func() error {
		if s.ownsCli {
			if err := s.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
				return fmt.Errorf("%s: close: %w", s.where, err)
			}
		}
		return nil
	})
}

// errRestart marks a read whose snapshot is gone; the transaction starts again.
var errRestart = errors.New("snapshot compacted; the transaction restarts")

// mapErr explains an etcd error and adds the store sentinel that matches it.
func (s *Store) mapErr(op string, err error) error {
	switch {
	case errors.Is(err, rpctypes.ErrNoSpace):
		return fmt.Errorf("%s: %s: %w: %w (etcd reached its --quota-backend-bytes: compact and defragment etcd, then disarm the NOSPACE alarm)", s.where, op, store.ErrFull, err)
	case errors.Is(err, rpctypes.ErrTooManyOps):
		return fmt.Errorf("%s: %s: %w (run etcd with --max-txn-ops 16384)", s.where, op, err)
	case errors.Is(err, rpctypes.ErrRequestTooLarge):
		return fmt.Errorf("%s: %s: %w (run etcd with --max-request-bytes 16777216)", s.where, op, err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: %s: no answer within %v (is etcd up and does it have a quorum?): %w", s.where, op, s.cfg.RequestTimeout, err)
	}
	return fmt.Errorf("%s: %s: %w", s.where, op, err)
}

// tx is one attempt of a transaction. buf is nil in a View.
type tx struct {
	txbuf.Front // pending writes, checks
	s           *Store
	ctx         context.Context
	rev         int64            // snapshot revision; 0 until the first read
	reads       map[string]int64 // etcd key -> mod revision seen (0: missing)
	ranges      map[string]bool  // bucket range prefixes listed
	// cache holds what this transaction read at its snapshot, so a key read again, or
	// read after a List or Prefetch that returned it, costs no round trip.
	cache map[string]cached
	// fetched are the etcd key prefixes whose every key at the snapshot is in cache (a
	// List or a prefetched range): a key under one of them that cache lacks is missing.
	fetched []string
	restart error
}

// cached is one key as the transaction's snapshot holds it.
type cached struct {
	value  []byte // nil: the key is missing
	modRev int64  // 0 when missing
}

func (t *tx) key(bucket, key string) string { return t.s.cfg.Prefix + bucket + "/" + key }

// remember records what the snapshot holds at etcd key k.
func (t *tx) remember(k string, kvs []*mvccpb.KeyValue) cached {
	var c cached
	if len(kvs) > 0 {
		c = cached{value: txbuf.Clone(kvs[0].Value), modRev: kvs[0].ModRevision}
	}
	if t.cache == nil {
		t.cache = make(map[string]cached)
	}
	t.cache[k] = c
	return c
}

// covered reports whether a range already read holds every key starting with k.
func (t *tx) covered(k string) bool {
	for _, p := range t.fetched {
		if strings.HasPrefix(k, p) {
			return true
		}
	}
	return false
}

// lookup returns etcd key k as the snapshot holds it, if this transaction knows it.
func (t *tx) lookup(k string) (cached, bool) {
	if c, ok := t.cache[k]; ok {
		return c, true
	}
	return cached{}, t.covered(k)
}

// fixRev adopts the revision of the transaction's first read as its snapshot.
func (t *tx) fixRev(rev int64) {
	if t.rev == 0 {
		t.rev = rev
	}
}

// readErr turns a failed read into the transaction's error: a compacted snapshot makes
// the transaction start again.
func (t *tx) readErr(op string, err error) error {
	if errors.Is(err, rpctypes.ErrCompacted) {
		t.restart = fmt.Errorf("%s: %s: %w", t.s.where, op, errRestart)
		return t.restart
	}
	if t.ctx.Err() != nil {
		return fmt.Errorf("%s: %s: %w", t.s.where, op, t.ctx.Err())
	}
	return t.s.mapErr(op, err)
}

// get reads at the snapshot, fixing it on the first read.
func (t *tx) get(op string, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if t.restart != nil {
		return nil, t.restart
	}
	if t.rev > 0 {
		opts = append(opts, clientv3.WithRev(t.rev))
	}
	ctx, cancel := context.WithTimeout(t.ctx, t.s.cfg.RequestTimeout)
	defer cancel()
	resp, err := t.s.cli.Get(ctx, key, opts...)
	if err != nil {
		return nil, t.readErr(op, err)
	}
	t.fixRev(resp.Header.Revision)
	return resp, nil
}

// Prefetch implements store.Prefetcher: the keys and ranges not read yet are read in one
// etcd Txn (several Range operations, one linearizable round trip) at the snapshot.
func (t *tx) Prefetch(reads ...store.Read) error {
	if t.Done {
		return fmt.Errorf("%s: transaction used after its function returned", t.Where)
	}
	if t.restart != nil {
		return t.restart
	}
	type pending struct {
		key   string
		whole bool // a range
	}
	var want []pending
	var ops []clientv3.Op
	for _, r := range reads {
		var opts []clientv3.OpOption
		var k string
		if r.Prefix {
			if txbuf.CheckBucket(r.Bucket) != nil {
				continue // a hint only: the List reports the bad name
			}
			if k = t.key(r.Bucket, r.Key); t.covered(k) {
				continue
			}
			opts = append(opts, clientv3.WithPrefix())
		} else {
			if txbuf.CheckName(r.Bucket, r.Key) != nil {
				continue
			}
			if k = t.key(r.Bucket, r.Key); func() bool { _, ok := t.lookup(k); return ok }() {
				continue
			}
		}
		if t.rev > 0 {
			opts = append(opts, clientv3.WithRev(t.rev))
		}
		want = append(want, pending{key: k, whole: r.Prefix})
		ops = append(ops, clientv3.OpGet(k, opts...))
	}
	if len(ops) == 0 {
		return nil
	}
	op := fmt.Sprintf("prefetch of %d reads", len(ops))
	ctx, cancel := context.WithTimeout(t.ctx, t.s.cfg.RequestTimeout)
	defer cancel()
	resp, err := t.s.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return t.readErr(op, err)
	}
	if len(resp.Responses) != len(want) {
		return fmt.Errorf("%s: %s: etcd answered %d of them; try again", t.s.where, op, len(resp.Responses))
	}
	t.fixRev(resp.Header.Revision)
	for i, r := range resp.Responses {
		kvs := r.GetResponseRange().GetKvs()
		if !want[i].whole {
			t.remember(want[i].key, kvs)
			continue
		}
		for _, kv := range kvs {
			t.remember(string(kv.Key), []*mvccpb.KeyValue{kv})
		}
		t.fetched = append(t.fetched, want[i].key)
	}
	return nil
}

func (t *tx) Get(bucket, key string) ([]byte, error) {
	if err := t.Check(bucket, key, false); err != nil {
		return nil, err
	}
	if v, ok, err := t.Pending(bucket, key); ok {
		return v, err
	}
	k := t.key(bucket, key)
	c, ok := t.lookup(k)
	if !ok {
		resp, err := t.get(fmt.Sprintf("get %s/%q", bucket, key), k)
		if err != nil {
			return nil, err
		}
		c = t.remember(k, resp.Kvs)
	}
	if t.reads != nil {
		if _, seen := t.reads[k]; !seen {
			t.reads[k] = c.modRev
		}
	}
	if c.value == nil {
		return nil, fmt.Errorf("%s/%q: %w", bucket, key, store.ErrNotFound)
	}
	return txbuf.Clone(c.value), nil
}

func (t *tx) List(bucket, prefix string, fn func(key string, value []byte) error) error {
	if err := t.CheckOpen(bucket); err != nil {
		return err
	}
	bucketPrefix := t.key(bucket, "")
	from := bucketPrefix + prefix
	var kvs []txbuf.KV
	if t.covered(from) {
		for k, c := range t.cache {
			if c.value != nil && len(k) > len(bucketPrefix) && strings.HasPrefix(k, from) {
				kvs = append(kvs, txbuf.KV{Key: k[len(bucketPrefix):], Value: txbuf.Clone(c.value)})
			}
		}
		slices.SortFunc(kvs, func(a, b txbuf.KV) int { return strings.Compare(a.Key, b.Key) })
	} else {
		resp, err := t.get(fmt.Sprintf("list %s/%q", bucket, prefix), from,
			clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return err
		}
		kvs = make([]txbuf.KV, 0, len(resp.Kvs))
		for _, kv := range resp.Kvs {
			t.remember(string(kv.Key), []*mvccpb.KeyValue{kv})
			k := string(kv.Key[len(bucketPrefix):])
			if k == "" {
				continue // the bucket's marker
			}
			kvs = append(kvs, txbuf.KV{Key: k, Value: txbuf.Clone(kv.Value)})
		}
		t.fetched = append(t.fetched, from)
	}
	if t.ranges != nil {
		t.ranges[bucketPrefix] = true
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

// appliedAnyway resolves etcd's NOSPACE answer, which it gives both to a write it refused
// before applying and to the write that crossed the quota, applied (etcd's quota applier
// applies, then reports). The write was applied when every key it put now holds its
// value at one revision (a transaction is one revision) newer than the snapshot; no
// other writer can have overwritten them since, as the NOSPACE alarm stops writes.
func (t *tx) appliedAnyway(puts map[string]string) bool {
	if len(puts) == 0 {
		return false
	}
	ops := make([]clientv3.Op, 0, len(puts))
	for k := range puts {
		ops = append(ops, clientv3.OpGet(k))
	}
	ctx, cancel := context.WithTimeout(t.ctx, t.s.cfg.RequestTimeout)
	defer cancel()
	resp, err := t.s.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return false
	}
	var rev int64
	for _, r := range resp.Responses {
		kvs := r.GetResponseRange().GetKvs()
		if len(kvs) != 1 || puts[string(kvs[0].Key)] != string(kvs[0].Value) || kvs[0].ModRevision <= t.rev {
			return false
		}
		if rev != 0 && kvs[0].ModRevision != rev {
			return false
		}
		rev = kvs[0].ModRevision
	}
	return true
}

// commit applies the buffered writes if nothing read changed; false means a conflict.
func (t *tx) commit() (bool, error) {
	if t.Buf.Empty() {
		return true, nil // read-only: the snapshot was consistent
	}
	var cmps []clientv3.Cmp
	for k, rev := range t.reads {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", rev))
	}
	for p := range t.ranges {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(p), "<", t.rev+1).WithPrefix())
	}
	var ops []clientv3.Op
	puts := map[string]string{}
	for _, b := range t.Buf.Buckets() {
		deletes := false
		_ = t.Buf.Each(b, func(key string, value []byte, deleted bool) error {
			if deleted {
				deletes = true
				ops = append(ops, clientv3.OpDelete(t.key(b, key)))
			} else {
				ops = append(ops, clientv3.OpPut(t.key(b, key), string(value)))
				puts[t.key(b, key)] = string(value)
			}
			return nil
		})
		if deletes {
			ops = append(ops, clientv3.OpPut(t.key(b, ""), ""))
		}
	}
	ctx, cancel := context.WithTimeout(t.ctx, t.s.cfg.RequestTimeout)
	defer cancel()
	resp, err := t.s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if errors.Is(err, rpctypes.ErrNoSpace) && t.appliedAnyway(puts) {
		t.s.cfg.Log.Warn("etcd store: the write committed but etcd is now over its space quota; further writes will fail until space is reclaimed", "where", t.s.where)
		return true, nil
	}
	if err != nil {
		if t.ctx.Err() != nil {
			return false, fmt.Errorf("%s: commit: %w", t.s.where, t.ctx.Err())
		}
		// The outcome of a commit that timed out is unknown: say so.
		return false, t.s.mapErr(fmt.Sprintf("commit of %d writes (outcome unknown if it timed out)", len(ops)), err)
	}
	return resp.Succeeded, nil
}
