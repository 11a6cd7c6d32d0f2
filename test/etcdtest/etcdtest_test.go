package etcdtest_test

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

func client(t *testing.T, eps []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func TestCluster(t *testing.T) {
	cases := []struct {
		name    string
		members int
	}{
		{"one member", 1},
		{"three members, one killed", 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl := etcdtest.New(t, etcdtest.Config{Members: c.members})
			if got := len(cl.Endpoints()); got != c.members {
				t.Fatalf("%d endpoints, want %d", got, c.members)
			}
			cli := client(t, cl.Endpoints())
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := cli.Put(ctx, "k", "v1"); err != nil {
				t.Fatalf("put: %v", err)
			}
			if c.members > 1 {
				victim := cl.Members()[0]
				if err := victim.Kill(); err != nil {
					t.Fatal(err)
				}
				if victim.Running() {
					t.Fatal("killed member still running")
				}
				// The survivors keep a quorum: after electing a new leader if the victim
				// led, they answer a linearizable write and read.
				cli = client(t, cl.Endpoints()[1:])
				e2e.WaitFor(t, 15*time.Second, "a write after losing one member of three", func() bool {
					pctx, cancel := context.WithTimeout(ctx, time.Second)
					defer cancel()
					_, err := cli.Put(pctx, "k", "v2")
					return err == nil
				})
			}
			resp, err := cli.Get(ctx, "k")
			if err != nil {
				t.Fatalf("get: %v", err)
			}
			want := "v1"
			if c.members > 1 {
				want = "v2"
			}
			if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != want {
				t.Fatalf("get = %v, want %s", resp.Kvs, want)
			}
			if err := cl.Stop(); err != nil {
				t.Fatalf("stop: %v", err)
			}
			for _, m := range cl.Members() {
				if m.Running() {
					t.Fatalf("member %s still running after Stop", m.Name)
				}
			}
			if err := cl.Stop(); err != nil {
				t.Fatalf("second stop: %v", err)
			}
		})
	}
}

func TestQuota(t *testing.T) {
	cl := etcdtest.New(t, etcdtest.Config{QuotaBytes: 1 << 20})
	cli := client(t, cl.Endpoints())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	big := string(make([]byte, 256<<10))
	var err error
	for i := 0; i < 40 && err == nil; i++ {
		_, err = cli.Put(ctx, "big", big)
	}
	if err == nil {
		t.Fatal("10 MiB of writes into a 1 MiB quota all succeeded")
	}
	t.Logf("refused as expected: %v", err)
}
