package storetest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/store"
)

// model is the reference: bucket -> key -> value.
type model map[string]map[string]string

func (m model) clone() model {
	out := model{}
	for b, kv := range m {
		out[b] = map[string]string{}
		for k, v := range kv {
			out[b][k] = v
		}
	}
	return out
}

func (m model) list(bucket, prefix string) []string {
	var ks []string
	for k := range m[bucket] {
		if strings.HasPrefix(k, prefix) {
			ks = append(ks, k)
		}
	}
	sort.Strings(ks) // bytewise, like the stores
	var out []string
	for _, k := range ks {
		out = append(out, k+"="+m[bucket][k])
	}
	return out
}

// testModel runs random transactions of Puts, Deletes, Gets and Lists, some of them
// failing, against the store and a map, and compares every read.
func testModel(t *testing.T, b Backend) {
	s := open(t, b)
	rng := rand.New(rand.NewPCG(1, 2))
	buckets := []string{"m1", "m2"}
	keys := []string{"k0", "k1", "k10", "k2", "k3", "k\x00", "k/x", "l"}
	prefixes := []string{"", "k", "k1", "k/", "l", "z"}
	committed := model{}
	errRefused := errors.New("refused on purpose")
	for n := 0; n < 150; n++ {
		write := rng.IntN(3) > 0
		fail := write && rng.IntN(5) == 0
		ops := 1 + rng.IntN(8)
		seed := rng.Uint64()
		var final model
		fn := func(tx store.Tx) error {
			r := rand.New(rand.NewPCG(seed, 0)) // the same ops on every run of fn
			cur := committed.clone()
			for i := 0; i < ops; i++ {
				bucket, key := buckets[r.IntN(len(buckets))], keys[r.IntN(len(keys))]
				where := fmt.Sprintf("transaction %d op %d", n, i)
				switch op := r.IntN(4); {
				case op == 0 && write:
					v := fmt.Sprintf("v%d", r.IntN(100))
					if err := tx.Put(bucket, key, []byte(v)); err != nil {
						return fmt.Errorf("%s: put: %w", where, err)
					}
					if cur[bucket] == nil {
						cur[bucket] = map[string]string{}
					}
					cur[bucket][key] = v
				case op == 1 && write:
					if err := tx.Delete(bucket, key); err != nil {
						return fmt.Errorf("%s: delete: %w", where, err)
					}
					delete(cur[bucket], key)
				case op == 2:
					v, err := tx.Get(bucket, key)
					want, ok := cur[bucket][key]
					switch {
					case !ok && !errors.Is(err, store.ErrNotFound):
						return fmt.Errorf("%s: get %s/%q = %q, %v; want not found", where, bucket, key, v, err)
					case ok && (err != nil || string(v) != want):
						return fmt.Errorf("%s: get %s/%q = %q, %v; want %q", where, bucket, key, v, err, want)
					}
				default:
					prefix := prefixes[r.IntN(len(prefixes))]
					var got []string
					if err := tx.List(bucket, prefix, func(k string, v []byte) error {
						got = append(got, k+"="+string(v))
						return nil
					}); err != nil {
						return fmt.Errorf("%s: list: %w", where, err)
					}
					if want := cur.list(bucket, prefix); fmt.Sprintf("%q", got) != fmt.Sprintf("%q", want) {
						return fmt.Errorf("%s: list %s/%q = %q; want %q", where, bucket, prefix, got, want)
					}
				}
			}
			final = cur
			if fail {
				return errRefused
			}
			return nil
		}
		var err error
		if write {
			err = s.Update(context.Background(), fn)
		} else {
			err = s.View(context.Background(), fn)
		}
		switch {
		case fail && errors.Is(err, errRefused):
		case err != nil:
			t.Fatal(err)
		case write:
			committed = final
		}
	}
	// Everything committed reads back outside any transaction too.
	for _, bucket := range buckets {
		if got, want := list(t, s, bucket, ""), committed.list(bucket, ""); fmt.Sprintf("%q", got) != fmt.Sprintf("%q", want) {
			t.Fatalf("bucket %s holds %q, want %q", bucket, got, want)
		}
	}
}
