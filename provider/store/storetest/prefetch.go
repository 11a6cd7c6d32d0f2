package storetest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/store"
)

// readAll runs the reads every prefetch case checks, in one transaction of s (an Update
// when update is true, which writes nothing), after store.Prefetch(reads...); it returns
// what they gave, one line each.
func readAll(t *testing.T, s store.Store, update bool, reads []store.Read) []string {
	t.Helper()
	var out []string
	fn := func(tx store.Tx) error {
		out = out[:0]
		if err := store.Prefetch(tx, reads...); err != nil {
			return err
		}
		for _, k := range []string{"a", "ab", "b", "missing", "z"} {
			v, err := tx.Get("pf", k)
			switch {
			case errors.Is(err, store.ErrNotFound):
				out = append(out, "get "+k+": <missing>")
			case err != nil:
				return err
			default:
				out = append(out, "get "+k+": "+string(v))
			}
		}
		for _, p := range []string{"", "a", "ab", "c"} {
			var kv []string
			err := tx.List("pf", p, func(k string, v []byte) error {
				kv = append(kv, k+"="+string(v))
				return nil
			})
			if err != nil {
				return err
			}
			out = append(out, fmt.Sprintf("list %q: %s", p, strings.Join(kv, " ")))
		}
		v, err := tx.Get("pf.other", "k")
		if err != nil {
			return err
		}
		out = append(out, "get other: "+string(v))
		return nil
	}
	var err error
	if update {
		err = s.Update(context.Background(), fn)
	} else {
		err = s.View(context.Background(), fn)
	}
	if err != nil {
		t.Fatalf("reads after Prefetch(%v): %v", reads, err)
	}
	return out
}

// testPrefetchSameResults: whatever a transaction prefetches, its Gets and Lists give
// what they give without Prefetch, in a View and in an Update.
func testPrefetchSameResults(t *testing.T, b Backend) {
	s := open(t, b)
	put(t, s, "pf", "a", "1", "pf", "ab", "2", "pf", "abc", "3", "pf", "b", "", "pf", "c", "5",
		"pf.other", "k", "o")
	want := readAll(t, s, false, nil)
	if len(want) != 10 || want[3] != "get missing: <missing>" || want[2] != "get b: " {
		t.Fatalf("reads without Prefetch: %q", want)
	}
	cases := []struct {
		name  string
		reads []store.Read
	}{
		{"nothing", nil},
		{"keys", []store.Read{store.Key("pf", "a"), store.Key("pf", "b"), store.Key("pf", "missing")}},
		{"whole bucket", []store.Read{store.Range("pf", "")}},
		{"sub-range", []store.Read{store.Range("pf", "ab")}},
		{"range and keys of two buckets", []store.Read{store.Range("pf", "a"), store.Key("pf", "z"), store.Key("pf.other", "k")}},
		{"range of an empty bucket", []store.Read{store.Range("pf.empty", ""), store.Key("pf.empty", "x")}},
		{"repeated reads", []store.Read{store.Key("pf", "a"), store.Key("pf", "a"), store.Range("pf", ""), store.Range("pf", "a")}},
		{"bad names are skipped", []store.Read{store.Key("PF", "a"), store.Key("pf", ""), store.Range("p/f", ""), store.Key("pf", "a")}},
	}
	for _, c := range cases {
		for _, update := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/update=%v", c.name, update), func(t *testing.T) {
				got := readAll(t, s, update, c.reads)
				if fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("with Prefetch:\n%q\nwithout:\n%q", got, want)
				}
			})
		}
	}
}

// testPrefetchLinearizable: a write committed (on either handle) before a transaction
// starts is seen by that transaction's Prefetch, and by the Gets and Lists it serves.
func testPrefetchLinearizable(t *testing.T, b Backend) {
	alternating(t, b, 20, func(i int, w, r store.Store) {
		put(t, w, "pfl", "k", strconv.Itoa(i), "pfl", "r"+strconv.Itoa(i), "x")
		var got string
		var n int
		err := r.View(context.Background(), func(tx store.Tx) error {
			if err := store.Prefetch(tx, store.Key("pfl", "k"), store.Range("pfl", "r")); err != nil {
				return err
			}
			v, err := tx.Get("pfl", "k")
			if err != nil {
				return err
			}
			got = string(v)
			return tx.List("pfl", "r", func(string, []byte) error { n++; return nil })
		})
		if err != nil {
			t.Fatal(err)
		}
		if got != strconv.Itoa(i) || n != i+1 {
			t.Fatalf("write %d committed before the View: the View read k=%q and %d keys r*", i, got, n)
		}
	})
}

// testPrefetchSnapshot: what a View reads after its Prefetch (prefetched or not) is one
// snapshot, although another handle commits in between.
func testPrefetchSnapshot(t *testing.T, b Backend) {
	if !b.SnapshotViews {
		t.Skip("this backend serialises Views with Updates; nothing to check")
	}
	x, y := pair(t, b)
	put(t, x, "pfs", "a", "1", "pfs", "b", "1", "pfs", "c", "1")
	var a, bb, c string
	err := x.View(context.Background(), func(tx store.Tx) error {
		if err := store.Prefetch(tx, store.Key("pfs", "a")); err != nil {
			return err
		}
		put(t, y, "pfs", "a", "2", "pfs", "b", "2", "pfs", "c", "2")
		if err := store.Prefetch(tx, store.Key("pfs", "b")); err != nil {
			return err
		}
		for _, kv := range []struct {
			k string
			v *string
		}{{"a", &a}, {"b", &bb}, {"c", &c}} {
			v, err := tx.Get("pfs", kv.k)
			if err != nil {
				return err
			}
			*kv.v = string(v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if a != "1" || bb != "1" || c != "1" {
		t.Fatalf("one View read a=%s b=%s c=%s, want the snapshot of its first read (all 1)", a, bb, c)
	}
}

// testPrefetchIncrements: read-modify-write after a Prefetch of the key, and of the
// bucket that is listed, from many goroutines on two handles loses nothing: a prefetched
// read is checked for conflicts as a plain one.
func testPrefetchIncrements(t *testing.T, b Backend) {
	x, y := pair(t, b)
	const workers, each = 6, 8
	failed := concurrently(t, x, y, "increment", workers, each, func(tx store.Tx) error {
		if err := store.Prefetch(tx, store.Key("pfc", "n"), store.Range("pfc.seq", "")); err != nil {
			return err
		}
		n, err := counter(tx, "pfc", "n")
		if err != nil {
			return err
		}
		seq := 0
		if err := tx.List("pfc.seq", "", func(string, []byte) error { seq++; return nil }); err != nil {
			return err
		}
		if err := tx.Put("pfc.seq", fmt.Sprintf("%04d", seq), nil); err != nil {
			return err
		}
		return tx.Put("pfc", "n", []byte(strconv.Itoa(n+1)))
	})
	want := workers*each - failed
	if got := get(t, x, "pfc", "n"); got != strconv.Itoa(want) {
		t.Fatalf("counter = %s after %d successful increments: an update was lost", got, want)
	}
	if got := len(list(t, x, "pfc.seq", "")); got != want {
		t.Fatalf("%d sequence keys after %d successful inserts: a List served from a prefetch missed an insert", got, want)
	}
}

// testPrefetchOwnWrites: in an Update, the transaction's own writes win over what it
// prefetched, before or after the Prefetch.
func testPrefetchOwnWrites(t *testing.T, b Backend) {
	s := open(t, b)
	put(t, s, "pfw", "a", "old", "pfw", "b", "old")
	var got []string
	err := s.Update(context.Background(), func(tx store.Tx) error {
		got = got[:0]
		if err := tx.Put("pfw", "a", []byte("new")); err != nil {
			return err
		}
		if err := store.Prefetch(tx, store.Range("pfw", ""), store.Key("pfw", "a")); err != nil {
			return err
		}
		if err := tx.Delete("pfw", "b"); err != nil {
			return err
		}
		if err := tx.Put("pfw", "c", []byte("new")); err != nil {
			return err
		}
		for _, k := range []string{"a", "b", "c"} {
			v, err := tx.Get("pfw", k)
			if errors.Is(err, store.ErrNotFound) {
				v, err = []byte("<missing>"), nil
			}
			if err != nil {
				return err
			}
			got = append(got, k+"="+string(v))
		}
		return tx.List("pfw", "", func(k string, v []byte) error {
			got = append(got, "list "+k+"="+string(v))
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "[a=new b=<missing> c=new list a=new list c=new]"
	if fmt.Sprint(got) != want {
		t.Fatalf("Update after Prefetch read %q, want %s", got, want)
	}
	if l := list(t, s, "pfw", ""); fmt.Sprint(l) != "[a=new c=new]" {
		t.Fatalf("after the Update the bucket holds %q", l)
	}
}

// testPrefetchAfterReturn: a Prefetcher refuses a Prefetch once the transaction's
// function returned, as Get does.
func testPrefetchAfterReturn(t *testing.T, b Backend) {
	s := open(t, b)
	var kept store.Tx
	if err := s.View(context.Background(), func(tx store.Tx) error { kept = tx; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, ok := kept.(store.Prefetcher); !ok {
		t.Skip("this backend's Tx has no Prefetch (a no-op hint there)")
	}
	if err := store.Prefetch(kept, store.Key("pf", "a")); err == nil {
		t.Fatal("Prefetch on a transaction whose function returned: no error")
	}
}
