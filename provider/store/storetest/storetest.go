// Package storetest is the contract every store.Store backend must meet, as one test that
// each backend's own tests run with a factory for empty stores:
//
//	func TestContract(t *testing.T) {
//		storetest.Run(t, storetest.Backend{New: func(t *testing.T) store.Store { return mem.New() }})
//	}
//
// FailStore wraps a real store to make its transactions fail on demand, for tests of
// what callers do when the store goes away.
//
// Only test code imports it.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"

	"github.com/nkp-dev/nkp/provider/store"
)

// Backend describes the backend under test.
type Backend struct {
	// New returns an empty store. Run closes it at the end of each subtest.
	New func(t *testing.T) store.Store
	// Pair returns two handles on one empty shared state, as two provider replicas have.
	// Nil: the concurrency tests use one handle from New twice.
	Pair func(t *testing.T) (store.Store, store.Store)
	// Full returns an empty store that refuses writes for lack of space after at most a
	// few MiB. Nil skips the full-store test.
	Full func(t *testing.T) store.Store
	// Reopen closes s and opens the same state again. Nil skips the persistence test.
	Reopen func(t *testing.T, s store.Store) store.Store
	// SnapshotViews is true when a View keeps reading its snapshot while an Update on
	// another handle commits (bbolt, etcd); false when Updates wait for Views (mem).
	SnapshotViews bool
}

// Run runs the contract as subtests of t.
func Run(t *testing.T, b Backend) {
	tests := []struct {
		name string
		fn   func(t *testing.T, b Backend)
	}{
		{"GetPutDelete", testGetPutDelete},
		{"RandomAgainstModel", testModel},
		{"EmptyAndLargeValues", testValues},
		{"ValuesAreCopies", testCopies},
		{"ListOrderAndPrefix", testList},
		{"ListSeesOwnWrites", testListOwnWrites},
		{"ListStopsOnError", testListStop},
		{"FailedUpdateWritesNothing", testRollback},
		{"ViewRefusesWrites", testViewWrites},
		{"BadNames", testBadNames},
		{"CancelledContext", testCancelled},
		{"Closed", testClosed},
		{"ConcurrentIncrements", testIncrements},
		{"ConcurrentInserts", testPhantoms},
		{"ConcurrentWithFailures", testMixed},
		{"CommitVisibleToOtherHandle", testVisible},
		{"SnapshotView", testSnapshot},
		{"Full", testFull},
		{"Persistence", testReopen},
		{"PrefetchSameResults", testPrefetchSameResults},
		{"PrefetchLinearizable", testPrefetchLinearizable},
		{"PrefetchSnapshot", testPrefetchSnapshot},
		{"PrefetchIncrements", testPrefetchIncrements},
		{"PrefetchOwnWrites", testPrefetchOwnWrites},
		{"PrefetchAfterReturn", testPrefetchAfterReturn},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, b) })
	}
}

func open(t *testing.T, b Backend) store.Store {
	t.Helper()
	s := b.New(t)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func put(t *testing.T, s store.Store, kv ...string) {
	t.Helper()
	err := s.Update(context.Background(), func(tx store.Tx) error {
		for i := 0; i+2 < len(kv); i += 3 {
			if err := tx.Put(kv[i], kv[i+1], []byte(kv[i+2])); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("put %q: %v", kv, err)
	}
}

// get returns the value, or "<missing>" for ErrNotFound.
func get(t *testing.T, s store.Store, bucket, key string) string {
	t.Helper()
	var out string
	err := s.View(context.Background(), func(tx store.Tx) error {
		v, err := tx.Get(bucket, key)
		if errors.Is(err, store.ErrNotFound) {
			out = "<missing>"
			return nil
		}
		out = string(v)
		return err
	})
	if err != nil {
		t.Fatalf("get %s/%s: %v", bucket, key, err)
	}
	return out
}

func list(t *testing.T, s store.Store, bucket, prefix string) []string {
	t.Helper()
	var out []string
	err := s.View(context.Background(), func(tx store.Tx) error {
		return tx.List(bucket, prefix, func(k string, v []byte) error {
			out = append(out, k+"="+string(v))
			return nil
		})
	})
	if err != nil {
		t.Fatalf("list %s/%q: %v", bucket, prefix, err)
	}
	return out
}

func testGetPutDelete(t *testing.T, b Backend) {
	s := open(t, b)
	if got := get(t, s, "b", "k"); got != "<missing>" {
		t.Fatalf("empty store: get = %q, want missing", got)
	}
	put(t, s, "b", "k", "v1", "b", "other", "x", "c", "k", "in-c")
	steps := []struct {
		name string
		fn   func(tx store.Tx) error
		want map[string]string // "bucket/key" -> value or <missing>
	}{
		{"read", func(store.Tx) error { return nil },
			map[string]string{"b/k": "v1", "b/other": "x", "c/k": "in-c", "c/other": "<missing>"}},
		{"overwrite", func(tx store.Tx) error { return tx.Put("b", "k", []byte("v2")) },
			map[string]string{"b/k": "v2", "c/k": "in-c"}},
		{"delete", func(tx store.Tx) error { return tx.Delete("b", "k") },
			map[string]string{"b/k": "<missing>", "b/other": "x", "c/k": "in-c"}},
		{"delete missing", func(tx store.Tx) error { return tx.Delete("b", "never") },
			map[string]string{"b/never": "<missing>", "b/other": "x"}},
		{"put then delete in one tx", func(tx store.Tx) error {
			if err := tx.Put("b", "tmp", []byte("t")); err != nil {
				return err
			}
			if v, err := tx.Get("b", "tmp"); err != nil || string(v) != "t" {
				return fmt.Errorf("own write: got %q, %v", v, err)
			}
			if err := tx.Delete("b", "tmp"); err != nil {
				return err
			}
			if _, err := tx.Get("b", "tmp"); !errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("own delete: got %v, want ErrNotFound", err)
			}
			return nil
		}, map[string]string{"b/tmp": "<missing>"}},
	}
	for _, st := range steps {
		if err := s.Update(context.Background(), st.fn); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		for bk, want := range st.want {
			i := bytes.IndexByte([]byte(bk), '/')
			if got := get(t, s, bk[:i], bk[i+1:]); got != want {
				t.Errorf("%s: %s = %q, want %q", st.name, bk, got, want)
			}
		}
	}
}

func testValues(t *testing.T, b Backend) {
	s := open(t, b)
	large := bytes.Repeat([]byte{0xA5, 0x00, 0xFF}, 64<<10/3)
	cases := []struct {
		key   string
		value []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"binary", []byte{0, 1, 2, 0xff}},
		{"large", large},
		{"key with / and \x00 bytes", []byte("odd key")},
	}
	err := s.Update(context.Background(), func(tx store.Tx) error {
		for _, c := range cases {
			if err := tx.Put("vals", c.key, c.value); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	check := func(tx store.Tx) error {
		for _, c := range cases {
			v, err := tx.Get("vals", c.key)
			if err != nil {
				return fmt.Errorf("%q: %w", c.key, err)
			}
			if !bytes.Equal(v, c.value) {
				t.Errorf("%q: got %d bytes, want %d", c.key, len(v), len(c.value))
			}
		}
		return nil
	}
	err = s.View(context.Background(), check)
	if err != nil {
		t.Fatal(err)
	}
	// Again after a List walked them (a backend may answer Gets from what List read).
	err = s.View(context.Background(), func(tx store.Tx) error {
		n := 0
		if err := tx.List("vals", "", func(string, []byte) error { n++; return nil }); err != nil {
			return err
		}
		if n != len(cases) {
			t.Errorf("List saw %d values, want %d", n, len(cases))
		}
		return check(tx)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func testCopies(t *testing.T, b Backend) {
	s := open(t, b)
	in := []byte("original")
	err := s.Update(context.Background(), func(tx store.Tx) error {
		if err := tx.Put("b", "k", in); err != nil {
			return err
		}
		in[0] = 'X' // after Put: must not reach the store
		v, err := tx.Get("b", "k")
		if err != nil {
			return err
		}
		v[0] = 'Y' // a returned value is the caller's
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.View(context.Background(), func(tx store.Tx) error {
		v, err := tx.Get("b", "k")
		if err != nil {
			return err
		}
		v[0] = 'Z'
		return tx.List("b", "", func(_ string, v []byte) error { v[1] = 'Z'; return nil })
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := get(t, s, "b", "k"); got != "original" {
		t.Fatalf("value changed through an aliased slice: %q", got)
	}
}

func testList(t *testing.T, b Backend) {
	s := open(t, b)
	put(t, s,
		"l", "b", "2", "l", "a", "1", "l", "ab", "3", "l", "a/b", "4", "l", "\xff", "5",
		"l", "a\x00", "6", "l", "B", "7",
		"l2", "a", "other bucket", "l.x", "a", "dotted bucket")
	cases := []struct {
		bucket, prefix string
		want           []string
	}{
		{"l", "", []string{"B=7", "a=1", "a\x00=6", "a/b=4", "ab=3", "b=2", "\xff=5"}},
		{"l", "a", []string{"a=1", "a\x00=6", "a/b=4", "ab=3"}},
		{"l", "a/", []string{"a/b=4"}},
		{"l", "c", nil},
		{"l2", "", []string{"a=other bucket"}},
		{"l.x", "", []string{"a=dotted bucket"}},
		{"none", "", nil},
	}
	for _, c := range cases {
		got := list(t, s, c.bucket, c.prefix)
		if fmt.Sprintf("%q", got) != fmt.Sprintf("%q", c.want) {
			t.Errorf("List(%q, %q) = %q, want %q", c.bucket, c.prefix, got, c.want)
		}
	}
}

func testListOwnWrites(t *testing.T, b Backend) {
	s := open(t, b)
	put(t, s, "o", "a", "1", "o", "b", "2", "o", "c", "3")
	var seen []string
	err := s.Update(context.Background(), func(tx store.Tx) error {
		for _, w := range []struct{ k, v string }{{"b", ""}, {"a", "1x"}, {"bb", "new"}, {"0", "first"}} {
			var err error
			if w.v == "" {
				err = tx.Delete("o", w.k)
			} else {
				err = tx.Put("o", w.k, []byte(w.v))
			}
			if err != nil {
				return err
			}
		}
		// fn may write while it walks: the walk sees the state at the List call.
		return tx.List("o", "", func(k string, v []byte) error {
			seen = append(seen, k+"="+string(v))
			return tx.Put("o", k+"-copy", v)
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"0=first", "a=1x", "bb=new", "c=3"}
	if fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("List inside Update = %q, want %q", seen, want)
	}
	after := list(t, s, "o", "")
	wantAfter := []string{"0=first", "0-copy=first", "a=1x", "a-copy=1x", "bb=new", "bb-copy=new", "c=3", "c-copy=3"}
	if fmt.Sprint(after) != fmt.Sprint(wantAfter) {
		t.Errorf("after commit = %q, want %q", after, wantAfter)
	}
}

func testListStop(t *testing.T, b Backend) {
	s := open(t, b)
	put(t, s, "s", "1", "a", "s", "2", "b", "s", "3", "c")
	stop := errors.New("stop here")
	n := 0
	err := s.View(context.Background(), func(tx store.Tx) error {
		return tx.List("s", "", func(string, []byte) error {
			n++
			if n == 2 {
				return stop
			}
			return nil
		})
	})
	if !errors.Is(err, stop) || n != 2 {
		t.Fatalf("List stopped after %d calls with %v; want 2 calls and the fn's error", n, err)
	}
}

func testRollback(t *testing.T, b Backend) {
	s := open(t, b)
	put(t, s, "r", "keep", "old")
	boom := errors.New("boom")
	err := s.Update(context.Background(), func(tx store.Tx) error {
		_ = tx.Put("r", "keep", []byte("new"))
		_ = tx.Put("r", "added", []byte("x"))
		_ = tx.Delete("r", "keep2")
		return fmt.Errorf("caller: %w", boom)
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Update returned %v, want the fn's error", err)
	}
	if got := list(t, s, "r", ""); fmt.Sprint(got) != "[keep=old]" {
		t.Fatalf("after a failed Update the bucket holds %q, want only keep=old", got)
	}
}

func testViewWrites(t *testing.T, b Backend) {
	s := open(t, b)
	ops := map[string]func(tx store.Tx) error{
		"Put":    func(tx store.Tx) error { return tx.Put("v", "k", []byte("x")) },
		"Delete": func(tx store.Tx) error { return tx.Delete("v", "k") },
	}
	for name, op := range ops {
		var opErr error
		err := s.View(context.Background(), func(tx store.Tx) error {
			opErr = op(tx)
			return nil
		})
		if err != nil {
			t.Fatalf("%s: View: %v", name, err)
		}
		if !errors.Is(opErr, store.ErrReadOnly) {
			t.Errorf("%s in a View returned %v, want ErrReadOnly", name, opErr)
		}
	}
	if got := get(t, s, "v", "k"); got != "<missing>" {
		t.Fatalf("a View wrote %q", got)
	}
}

func testBadNames(t *testing.T, b Backend) {
	s := open(t, b)
	cases := []struct{ bucket, key string }{
		{"", "k"},
		{"b", ""},
		{"has/slash", "k"},
		{"Upper", "k"},
		{string(bytes.Repeat([]byte("b"), 65)), "k"},
		{"b", string(bytes.Repeat([]byte("k"), 1025))},
	}
	for _, c := range cases {
		err := s.Update(context.Background(), func(tx store.Tx) error {
			return tx.Put(c.bucket, c.key, []byte("x"))
		})
		if err == nil {
			t.Errorf("Put(%q, %.20q) succeeded; want an error naming the bad name", c.bucket, c.key)
		}
	}
}

func testCancelled(t *testing.T, b Backend) {
	s := open(t, b)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ran := false
	for name, run := range map[string]func(context.Context, func(store.Tx) error) error{"View": s.View, "Update": s.Update} {
		err := run(ctx, func(store.Tx) error { ran = true; return nil })
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled context returned %v, want context.Canceled", name, err)
		}
	}
	if ran {
		t.Error("fn ran although the context was cancelled")
	}
}

func testClosed(t *testing.T, b Backend) {
	s := b.New(t)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	noop := func(store.Tx) error { return nil }
	if err := s.View(context.Background(), noop); !errors.Is(err, store.ErrClosed) {
		t.Errorf("View after Close: %v, want ErrClosed", err)
	}
	if err := s.Update(context.Background(), noop); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Update after Close: %v, want ErrClosed", err)
	}
}

func pair(t *testing.T, b Backend) (store.Store, store.Store) {
	if b.Pair == nil {
		s := open(t, b)
		return s, s
	}
	x, y := b.Pair(t)
	t.Cleanup(func() { _ = x.Close(); _ = y.Close() })
	return x, y
}

// testIncrements: read-modify-write from many goroutines on two handles loses nothing.
func testIncrements(t *testing.T, b Backend) {
	x, y := pair(t, b)
	const workers, each = 6, 10
	failed := concurrently(t, x, y, "increment", workers, each, func(tx store.Tx) error {
		return increment(tx, "ctr", "n")
	})
	want := workers*each - failed
	if got := get(t, x, "ctr", "n"); got != strconv.Itoa(want) {
		t.Fatalf("counter = %s after %d successful increments (%d gave up with ErrConflict): an update was lost", got, want, failed)
	}
	if failed > workers*each/2 {
		t.Fatalf("%d of %d updates gave up with ErrConflict; retries should absorb most conflicts", failed, workers*each)
	}
}

// concurrently runs update workers times each times in as many goroutines, alternating
// the handles x and y, and returns how many of the Updates gave up with ErrConflict; any
// other error fails the test, named by op.
func concurrently(t *testing.T, x, y store.Store, op string, workers, each int, update func(tx store.Tx) error) int {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := 0; w < workers; w++ {
		s := x
		if w%2 == 1 {
			s = y
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				errs <- s.Update(context.Background(), update)
			}
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			if !errors.Is(err, store.ErrConflict) {
				t.Fatalf("%s: %v", op, err)
			}
			failed++
		}
	}
	return failed
}

// increment adds one to the decimal counter at bucket/key in tx.
func increment(tx store.Tx, bucket, key string) error {
	n, err := counter(tx, bucket, key)
	if err != nil {
		return err
	}
	return tx.Put(bucket, key, []byte(strconv.Itoa(n+1)))
}

// counter reads the decimal counter at bucket/key in tx (a missing key counts 0).
func counter(tx store.Tx, bucket, key string) (int, error) {
	v, err := tx.Get(bucket, key)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return 0, nil
	case err != nil:
		return 0, err
	}
	return strconv.Atoi(string(v))
}

// testPhantoms: each transaction counts the keys of a bucket with List and inserts key
// number count; a transaction that missed a concurrent insert (a phantom) would reuse a
// number, so the bucket would end up with fewer keys than successful transactions.
func testPhantoms(t *testing.T, b Backend) {
	x, y := pair(t, b)
	const workers, each = 4, 8
	failed := concurrently(t, x, y, "insert", workers, each, func(tx store.Tx) error {
		n := 0
		if err := tx.List("seq", "", func(string, []byte) error { n++; return nil }); err != nil {
			return err
		}
		return tx.Put("seq", fmt.Sprintf("%04d", n), []byte("x"))
	})
	if got, ok := len(list(t, x, "seq", "")), workers*each-failed; got != ok {
		t.Fatalf("bucket holds %d keys after %d successful inserts: a List missed a concurrent insert", got, ok)
	}
}

// testVisible: once Update returns, a View on the other handle sees the write.
func testVisible(t *testing.T, b Backend) {
	alternating(t, b, 20, func(i int, w, r store.Store) {
		put(t, w, "vis", "k", strconv.Itoa(i))
		if got := get(t, r, "vis", "k"); got != strconv.Itoa(i) {
			t.Fatalf("write %d: the other handle reads %q", i, got)
		}
	})
}

// alternating calls f n times with a writer and a reader handle of a pair, swapping them
// each time (one store when the backend has no Pair).
func alternating(t *testing.T, b Backend, n int, f func(i int, w, r store.Store)) {
	x, y := pair(t, b)
	for i := 0; i < n; i++ {
		w, r := x, y
		if i%2 == 1 {
			w, r = y, x
		}
		f(i, w, r)
	}
}

// testMixed: concurrent Updates of which every third fails after writing; the failed
// ones leave nothing and the others all land, whatever the backend batches together.
func testMixed(t *testing.T, b Backend) {
	x, y := pair(t, b)
	const n = 48
	boom := errors.New("refused")
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		s := x
		if i%2 == 1 {
			s = y
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.Update(context.Background(), func(tx store.Tx) error {
				if err := tx.Put("mixed", fmt.Sprintf("%02d", i), []byte("x")); err != nil {
					return err
				}
				if err := tx.Delete("mixed", "absent"); err != nil {
					return err
				}
				if i%3 == 0 {
					return boom
				}
				return nil
			})
		}()
	}
	wg.Wait()
	var want []string
	for i, err := range errs {
		switch {
		case i%3 == 0 && !errors.Is(err, boom):
			t.Errorf("update %d returned %v, want its own error", i, err)
		case i%3 != 0 && err != nil:
			t.Errorf("update %d: %v", i, err)
		case i%3 != 0:
			want = append(want, fmt.Sprintf("%02d=x", i))
		}
	}
	if got := list(t, x, "mixed", ""); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after concurrent updates, some failing: %q, want %q", got, want)
	}
}

// testSnapshot: a View reads one consistent snapshot although another handle commits.
func testSnapshot(t *testing.T, b Backend) {
	if !b.SnapshotViews {
		t.Skip("this backend serialises Views with Updates; nothing to check")
	}
	x, y := pair(t, b)
	put(t, x, "snap", "a", "1", "snap", "b", "1")
	var a, bb string
	err := x.View(context.Background(), func(tx store.Tx) error {
		v, err := tx.Get("snap", "a")
		if err != nil {
			return err
		}
		a = string(v)
		put(t, y, "snap", "a", "2", "snap", "b", "2")
		v, err = tx.Get("snap", "b")
		if err != nil {
			return err
		}
		bb = string(v)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if a != bb {
		t.Fatalf("one View read a=%s and b=%s: not one snapshot", a, bb)
	}
}

func testFull(t *testing.T, b Backend) {
	if b.Full == nil {
		t.Skip("the backend offers no way to make a small store")
	}
	s := b.Full(t)
	t.Cleanup(func() { _ = s.Close() })
	put(t, s, "f", "first", "kept")
	chunk := bytes.Repeat([]byte("f"), 256<<10)
	var err error
	i := 0
	for ; i < 200; i++ {
		err = s.Update(context.Background(), func(tx store.Tx) error {
			return tx.Put("f", fmt.Sprintf("chunk%03d", i), chunk)
		})
		if err != nil {
			break
		}
	}
	if !errors.Is(err, store.ErrFull) {
		t.Fatalf("after %d chunks of 256 KiB: %v, want ErrFull", i, err)
	}
	if got := get(t, s, "f", "first"); got != "kept" {
		t.Fatalf("after ErrFull the first value reads %q", got)
	}
	if got := get(t, s, "f", fmt.Sprintf("chunk%03d", i)); got != "<missing>" {
		t.Fatalf("the refused write is visible (%d bytes)", len(got))
	}
	if i > 0 {
		if got := get(t, s, "f", fmt.Sprintf("chunk%03d", i-1)); len(got) != len(chunk) {
			t.Fatalf("the last accepted chunk reads %d bytes", len(got))
		}
	}
}

func testReopen(t *testing.T, b Backend) {
	if b.Reopen == nil {
		t.Skip("the backend keeps nothing across Close")
	}
	s := b.New(t)
	put(t, s, "p", "k", "v")
	s = b.Reopen(t, s)
	t.Cleanup(func() { _ = s.Close() })
	if got := get(t, s, "p", "k"); got != "v" {
		t.Fatalf("after reopen: %q, want v", got)
	}
}
