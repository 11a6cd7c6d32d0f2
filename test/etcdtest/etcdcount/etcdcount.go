// Package etcdcount counts the requests an etcd client sends to etcd's KV service, for
// tests that check how many round trips an operation costs. Only tests import it.
package etcdcount

import (
	"context"
	"sync/atomic"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Requests makes cli count its KV requests from now on and returns the counter: every Get
// counts, and every Txn when it is made (etcdstore commits every Txn it makes).
func Requests(cli *clientv3.Client) *atomic.Int64 {
	n := new(atomic.Int64)
	cli.KV = kv{KV: cli.KV, n: n}
	return n
}

// kv counts the Gets and Txns that pass through it.
type kv struct {
	clientv3.KV
	n *atomic.Int64
}

func (c kv) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.n.Add(1)
	return c.KV.Get(ctx, key, opts...)
}

func (c kv) Txn(ctx context.Context) clientv3.Txn {
	c.n.Add(1)
	return c.KV.Txn(ctx)
}
