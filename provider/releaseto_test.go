package provider_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/test/etcdtest"
	"github.com/nkp-dev/nkp/test/etcdtest/etcdcount"
)

// TestCheckReleaseOnReplicas: replica b answers a host's poll (CheckRelease, the API's
// GET /v1/host/kdks?known=) from one read of the store, audits nothing, and still sees
// at once a revocation, a rotation, a backup and a retirement committed on replica a; the
// key set it reports changes exactly when the keys a release would hand out change. On
// etcd a poll costs exactly one etcd request.
func TestCheckReleaseOnReplicas(t *testing.T) {
	tests := []struct {
		name string
		open func(t *testing.T) (a, b store.Store, requests *atomic.Int64)
	}{
		{"mem", func(t *testing.T) (store.Store, store.Store, *atomic.Int64) { s := mem.New(); return s, s, nil }},
		{"bolt", func(t *testing.T) (store.Store, store.Store, *atomic.Int64) { s := openBolt(t); return s, s, nil }},
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
			a, b := replicas(t, sa, sb)
			h0, h1 := a.enroll(t, "kvm-0", nil), a.enroll(t, "kvm-1", nil)
			a.backup(t, "p: correct horse battery")

			// fetch has b release to h and returns the versions it got and their key set.
			fetch := func(h *host) (string, string) {
				got, out, set, err := b.p.ReleaseTo(ctx, h.cert)
				if err != nil || got.ID != h.id {
					t.Fatalf("ReleaseTo of %s: host %s, %v", h.id, got.ID, err)
				}
				var vs []int
				for _, k := range out {
					vs = append(vs, k.Version)
					k.Wipe()
				}
				return fmt.Sprint(vs), set
			}
			head := func() uint64 {
				recs, err := a.p.Audit(ctx, 1)
				if err != nil {
					t.Fatal(err)
				}
				return recs[0].Seq
			}
			v, set := fetch(h0)
			if v != "[1]" || set == "" {
				t.Fatalf("first fetch: versions %s, key set %q", v, set)
			}
			seq := head()
			var before int64
			if requests != nil {
				before = requests.Load()
			}
			got, polled, err := b.p.CheckRelease(ctx, h0.cert)
			if err != nil || got.ID != h0.id || polled != set {
				t.Fatalf("CheckRelease: host %s, key set %q, %v; want %s, %q", got.ID, polled, err, h0.id, set)
			}
			if requests != nil {
				if n := requests.Load() - before; n != 1 {
					t.Fatalf("a poll on etcd made %d etcd requests, want 1", n)
				}
			}
			if head() != seq {
				t.Fatal("CheckRelease added an audit record")
			}

			steps := []struct {
				name    string
				change  func() error
				host    *host
				changed bool // the key set differs from the one before the step
				err     error
			}{
				{"revoke on a", func() error { return a.p.Revoke(ctx, h0.id) }, h0, false, provider.ErrHostRevoked},
				{"other host unaffected", func() error { return nil }, h1, false, nil},
				{"rotate on a", func() error { _, err := a.p.Rotate(ctx); return err }, h1, false, provider.ErrNotBackedUp},
				{"backup on a", func() error { a.backup(t, "p: correct horse battery"); return nil }, h1, true, nil},
				{"retire on a", func() error { return a.p.Retire(ctx, 1) }, h1, true, nil},
				{"nil certificate", func() error { return nil }, &host{}, false, provider.ErrHostUnknown},
			}
			last := set
			for _, s := range steps {
				if err := s.change(); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				_, now, err := b.p.CheckRelease(ctx, s.host.cert)
				if !errors.Is(err, s.err) || (err == nil) != (s.err == nil) {
					t.Fatalf("%s, then a poll on b: %v, want %v", s.name, err, s.err)
				}
				if err != nil {
					continue
				}
				if (now != last) != s.changed {
					t.Fatalf("%s: key set %q after %q, want changed=%v", s.name, now, last, s.changed)
				}
				if _, set := fetch(s.host); set != now {
					t.Fatalf("%s: the release's key set %q differs from the poll's %q", s.name, set, now)
				}
				last = now
			}
		})
	}
}
