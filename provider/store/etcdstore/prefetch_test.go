package etcdstore_test

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/test/etcdtest/etcdcount"
)

// TestPrefetchRoundTrips: a transaction that prefetches what it reads costs one etcd
// request, whatever it then Gets and Lists of it; without Prefetch each read is one.
func TestPrefetchRoundTrips(t *testing.T) {
	requireEtcd(t)
	ctx := context.Background()
	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	n := etcdcount.Requests(cli)
	s, err := etcdstore.New(cli, etcdstore.Config{Prefix: "/test/" + t.Name() + "/"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.Update(ctx, func(tx store.Tx) error {
		for _, kv := range [][3]string{{"provider", "meta", "m"}, {"hosts", "h1", "x"}, {"kdks", "1", "k1"}, {"kdks", "2", "k2"}} {
			if err := tx.Put(kv[0], kv[1], []byte(kv[2])); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	reads := func(tx store.Tx) error {
		for _, k := range [][2]string{{"provider", "meta"}, {"hosts", "h1"}, {"hosts", "h1"}} {
			if _, err := tx.Get(k[0], k[1]); err != nil {
				return err
			}
		}
		if _, err := tx.Get("hosts", "absent"); err == nil {
			return store.ErrConflict // anything but nil: the key is not there
		}
		return tx.List("kdks", "", func(string, []byte) error { return nil })
	}
	all := []store.Read{store.Key("provider", "meta"), store.Key("hosts", "h1"), store.Key("hosts", "absent"), store.Range("kdks", "")}
	cases := []struct {
		name     string
		update   bool
		prefetch []store.Read
		want     int64
	}{
		{"view, no prefetch", false, nil, 4}, // meta, h1, absent, list (h1 again is cached)
		{"view, everything prefetched", false, all, 1},
		{"view, part prefetched", false, all[:2], 3},
		{"read-only update, everything prefetched", true, all, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fn := func(tx store.Tx) error {
				if err := store.Prefetch(tx, c.prefetch...); err != nil {
					return err
				}
				return reads(tx)
			}
			before := n.Load()
			if c.update {
				err = s.Update(ctx, fn)
			} else {
				err = s.View(ctx, fn)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := n.Load() - before; got != c.want {
				t.Fatalf("%d etcd requests, want %d", got, c.want)
			}
		})
	}
}
