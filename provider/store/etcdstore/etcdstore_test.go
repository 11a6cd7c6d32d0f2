package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/provider/store/storetest"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// shared is one etcd for the package's tests (each test uses its own prefix); nil when
// etcd is not installed.
var shared *etcdtest.Cluster

func TestMain(m *testing.M) {
	code := func() int {
		if _, err := exec.LookPath(etcdtest.Binary); err == nil {
			c, err := etcdtest.Start(context.Background(), etcdtest.Config{})
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer c.Stop()
			shared = c
		}
		return m.Run()
	}()
	os.Exit(code)
}

var prefixes atomic.Int64

// openPrefix opens a store on the shared cluster under prefix (a fresh one when "").
func openPrefix(t *testing.T, prefix string, eps []string) *etcdstore.Store {
	t.Helper()
	if prefix == "" {
		prefix = fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Add(1))
	}
	s, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: eps, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func requireEtcd(t *testing.T) {
	t.Helper()
	e2e.Require(t, etcdtest.Binary)
	if shared == nil {
		t.Fatal("etcd is installed but the shared cluster did not start")
	}
}

func TestContract(t *testing.T) {
	requireEtcd(t)
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) store.Store { return openPrefix(t, "", shared.Endpoints()) },
		Pair: func(t *testing.T) (store.Store, store.Store) {
			a := openPrefix(t, "", shared.Endpoints())
			prefix := fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Load())
			return a, openPrefix(t, prefix, shared.Endpoints())
		},
		Full: func(t *testing.T) store.Store {
			c := etcdtest.New(t, etcdtest.Config{QuotaBytes: 2 << 20})
			return openPrefix(t, "", c.Endpoints())
		},
		Reopen: func(t *testing.T, s store.Store) store.Store {
			s.Close()
			prefix := fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Load())
			return openPrefix(t, prefix, shared.Endpoints())
		},
		SnapshotViews: true,
	})
}

// An Update whose read key changes under it on every attempt gives up with ErrConflict
// after MaxAttempts runs and writes nothing.
func TestConflictGivesUp(t *testing.T) {
	requireEtcd(t)
	prefix := fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Add(1))
	ctx := context.Background()
	s, err := etcdstore.Open(ctx, etcdstore.Config{Endpoints: shared.Endpoints(), Prefix: prefix, MaxAttempts: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	other := openPrefix(t, prefix, shared.Endpoints())
	defer other.Close()
	runs := 0
	err = s.Update(ctx, func(tx store.Tx) error {
		runs++
		if _, err := tx.Get("b", "contended"); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		// Another replica writes the key between this read and the commit.
		if err := other.Update(ctx, func(tx store.Tx) error {
			return tx.Put("b", "contended", []byte(fmt.Sprint(runs)))
		}); err != nil {
			return err
		}
		return tx.Put("b", "result", []byte("must not land"))
	})
	if !errors.Is(err, store.ErrConflict) || runs != 3 {
		t.Fatalf("Update = %v after %d runs; want ErrConflict after 3", err, runs)
	}
	err = s.View(ctx, func(tx store.Tx) error {
		_, err := tx.Get("b", "result")
		return err
	})
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a conflicting Update left its write: %v", err)
	}
}

// A delete of a listed key by another replica is a conflict, like an insert.
func TestListConflictsWithDelete(t *testing.T) {
	requireEtcd(t)
	prefix := fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Add(1))
	ctx := context.Background()
	a, b := openPrefix(t, prefix, shared.Endpoints()), openPrefix(t, prefix, shared.Endpoints())
	defer a.Close()
	defer b.Close()
	if err := a.Update(ctx, func(tx store.Tx) error { return tx.Put("hosts", "h1", []byte("x")) }); err != nil {
		t.Fatal(err)
	}
	runs := 0
	var counted []int
	err := a.Update(ctx, func(tx store.Tx) error {
		runs++
		n := 0
		if err := tx.List("hosts", "", func(string, []byte) error { n++; return nil }); err != nil {
			return err
		}
		counted = append(counted, n)
		if runs == 1 {
			if err := b.Update(ctx, func(tx store.Tx) error { return tx.Delete("hosts", "h1") }); err != nil {
				return err
			}
		}
		return tx.Put("count", "hosts", []byte(fmt.Sprint(n)))
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(counted) != "[1 0]" {
		t.Fatalf("List counts per run = %v; want [1 0] (the concurrent delete forces a rerun)", counted)
	}
}

// With etcd gone, a transaction fails within its request timeout with a clear error.
func TestUnreachable(t *testing.T) {
	e2e.Require(t, etcdtest.Binary)
	c := etcdtest.New(t, etcdtest.Config{})
	ctx := context.Background()
	s, err := etcdstore.Open(ctx, etcdstore.Config{Endpoints: c.Endpoints(), RequestTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = s.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.Get("b", "k"); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		return tx.Put("b", "k", []byte("v"))
	})
	if err == nil || !strings.Contains(err.Error(), "no answer within") {
		t.Fatalf("Update against a stopped etcd = %v; want a timeout naming the wait", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Update took %v to fail", d)
	}

	_, err = etcdstore.Open(ctx, etcdstore.Config{Endpoints: c.Endpoints(), DialTimeout: 300 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "not answering") {
		t.Fatalf("Open against a stopped etcd = %v", err)
	}
}

func TestConfig(t *testing.T) {
	cases := []struct {
		name string
		cfg  etcdstore.Config
		want string
	}{
		{"no endpoints", etcdstore.Config{}, "no endpoints"},
		{"prefix without slash", etcdstore.Config{Endpoints: []string{"http://127.0.0.1:1"}, Prefix: "/nkp"}, "must end with"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := etcdstore.Open(context.Background(), c.cfg)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Open = %v, want an error saying %q", err, c.want)
			}
		})
	}
}

func BenchmarkStore(b *testing.B) {
	e2e.Require(b, etcdtest.Binary)
	s, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: shared.Endpoints(), Prefix: "/bench/"})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	storetest.Benchmark(b, s)
}

// A transaction beyond etcd's --max-txn-ops fails with an error naming the flag and
// writes nothing.
func TestTooManyOps(t *testing.T) {
	requireEtcd(t)
	s := openPrefix(t, "", shared.Endpoints())
	defer s.Close()
	err := s.Update(context.Background(), func(tx store.Tx) error {
		for i := 0; i < 16385; i++ {
			if err := tx.Put("many", fmt.Sprintf("%05d", i), nil); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "--max-txn-ops") {
		t.Fatalf("Update of 16385 writes = %v, want an error naming --max-txn-ops", err)
	}
	err = s.View(context.Background(), func(tx store.Tx) error {
		_, err := tx.Get("many", "00000")
		return err
	})
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a refused transaction left writes: %v", err)
	}
}

// A View whose snapshot is compacted away between two reads runs again on a new
// snapshot instead of failing or mixing two states.
func TestCompactedSnapshotRestarts(t *testing.T) {
	requireEtcd(t)
	prefix := fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Add(1))
	ctx := context.Background()
	s := openPrefix(t, prefix, shared.Endpoints())
	defer s.Close()
	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.Endpoints(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	write := func(v string) {
		t.Helper()
		if _, err := cli.Put(ctx, prefix+"b/a", v); err != nil {
			t.Fatal(err)
		}
		resp, err := cli.Put(ctx, prefix+"b/b", v)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
			t.Fatal(err)
		}
	}
	write("1")
	runs := 0
	var a, b []byte
	err = s.View(ctx, func(tx store.Tx) error {
		runs++
		var err error
		if a, err = tx.Get("b", "a"); err != nil {
			return err
		}
		if runs == 1 {
			write("2") // and compact: the first snapshot is gone
		}
		b, err = tx.Get("b", "b")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 2 || string(a) != "2" || string(b) != "2" {
		t.Fatalf("View ran %d times and read a=%s b=%s; want 2 runs reading 2 and 2", runs, a, b)
	}
}
