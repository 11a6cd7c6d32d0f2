package provider_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/provider/store/etcdstore/etcdcount"
	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// TestReleaseToOnReplicas: replica b serves a host's repeated fetches (ReleaseTo, as the
// API's key fetch) from one read of the store, and still sees at once a revocation,
// a rotation, a backup and a retirement committed on replica a. On etcd a covered fetch
// costs exactly one etcd request.
func TestReleaseToOnReplicas(t *testing.T) {
	tests := []struct {
		name string
		open func(t *testing.T) (a, b store.Store, requests *atomic.Int64)
	}{
		{"mem", func(t *testing.T) (store.Store, store.Store, *atomic.Int64) { s := mem.New(); return s, s, nil }},
		{"bolt", func(t *testing.T) (store.Store, store.Store, *atomic.Int64) {
			s, err := boltstore.Open(filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s, s, nil
		}},
		{"etcd", func(t *testing.T) (store.Store, store.Store, *atomic.Int64) {
			c := etcdtest.New(t, etcdtest.Config{})
			a, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: c.Endpoints()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { a.Close() })
			cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cli.Close() })
			n := etcdcount.Requests(cli)
			b, err := etcdstore.New(cli, etcdstore.Config{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			return a, b, n
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			sa, sb, requests := tt.open(t)
			rk, err := rootkey.Generate()
			if err != nil {
				t.Fatal(err)
			}
			c := newClock()
			a := open(t, sa, rk, c)
			if _, err := a.p.Init(ctx, provider.InitOptions{}); err != nil {
				t.Fatal(err)
			}
			b := open(t, sb, rk, c)
			h0, h1 := a.enroll(t, "kvm-0", nil), a.enroll(t, "kvm-1", nil)
			a.backup(t, "p: correct horse battery")

			// fetch has b release to h and returns the versions it got.
			fetch := func(h *host) (string, error) {
				got, out, err := b.p.ReleaseTo(ctx, h.cert)
				if err != nil {
					return "", err
				}
				if got.ID != h.id {
					t.Fatalf("ReleaseTo returned host %s, want %s", got.ID, h.id)
				}
				var vs []int
				for _, k := range out {
					vs = append(vs, k.Version)
					k.Wipe()
				}
				return fmt.Sprint(vs), nil
			}
			audited := func() uint64 {
				recs, err := a.p.Audit(ctx, 1)
				if err != nil {
					t.Fatal(err)
				}
				return recs[0].Seq
			}
			for _, h := range []*host{h0, h1} {
				if v, err := fetch(h); err != nil || v != "[1]" {
					t.Fatalf("first fetch of %s: %s, %v", h.id, v, err)
				}
			}
			head := audited()
			var before int64
			if requests != nil {
				before = requests.Load()
			}
			if v, err := fetch(h0); err != nil || v != "[1]" {
				t.Fatalf("repeated fetch: %s, %v", v, err)
			}
			if requests != nil {
				if got := requests.Load() - before; got != 1 {
					t.Fatalf("a covered fetch on etcd made %d etcd requests, want 1", got)
				}
			}
			if got := audited(); got != head {
				t.Fatalf("a covered fetch added audit records %d..%d", head+1, got)
			}

			steps := []struct {
				name   string
				change func() error
				host   *host
				want   string
				err    error
			}{
				{"revoke on a", func() error { return a.p.Revoke(ctx, h0.id) }, h0, "", provider.ErrHostRevoked},
				{"other host unaffected", func() error { return nil }, h1, "[1]", nil},
				{"rotate on a", func() error { _, err := a.p.Rotate(ctx); return err }, h1, "", provider.ErrNotBackedUp},
				{"backup on a", func() error { a.backup(t, "p: correct horse battery"); return nil }, h1, "[1 2]", nil},
				{"retire on a", func() error { return a.p.Retire(ctx, 1) }, h1, "[2]", nil},
				{"nil certificate", func() error { return nil }, &host{}, "", provider.ErrHostUnknown},
			}
			for _, s := range steps {
				if err := s.change(); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				var v string
				var err error
				if s.host.cert == nil {
					_, _, err = b.p.ReleaseTo(ctx, nil)
				} else {
					v, err = fetch(s.host)
				}
				if v != s.want || !errors.Is(err, s.err) || (err == nil) != (s.err == nil) {
					t.Fatalf("%s, then the next fetch on b: versions %q, %v; want %q, %v", s.name, v, err, s.want, s.err)
				}
			}
		})
	}
}
