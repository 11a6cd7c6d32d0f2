package etcdcount_test

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nkp-dev/nkp/test/etcdtest"
	"github.com/nkp-dev/nkp/test/etcdtest/etcdcount"
)

// TestRequests: each Get and each Txn made through the client counts once; Puts do not.
func TestRequests(t *testing.T) {
	c := etcdtest.New(t, etcdtest.Config{})
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	n := etcdcount.Requests(cli)
	ctx := context.Background()
	tests := []struct {
		name string
		do   func() error
		want int64
	}{
		{"put", func() error { _, err := cli.Put(ctx, "k", "v"); return err }, 0},
		{"get", func() error { _, err := cli.Get(ctx, "k"); return err }, 1},
		{"txn", func() error { _, err := cli.Txn(ctx).Then(clientv3.OpGet("k")).Commit(); return err }, 1},
	}
	for _, tt := range tests {
		before := n.Load()
		if err := tt.do(); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if got := n.Load() - before; got != tt.want {
			t.Errorf("%s counted %d requests, want %d", tt.name, got, tt.want)
		}
	}
}
