package provider_test

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// TestFullStore: when etcd reaches its space quota, writes through the provider are
// refused with a sentence that says what to do, reads keep working, and nothing that was
// committed is lost.
func TestFullStore(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	etcd := etcdtest.New(t, etcdtest.Config{QuotaBytes: 4 << 20})
	storeArgs := etcdStoreArgs(etcd)
	dir := b.initProvider(t, storeArgs...)
	s := b.serve(t, dir, storeArgs...)
	b.backUp(t, dir, s.url)
	h := b.mustJoin(t, s, "kvm-01")
	before, err := h.c.Release(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// Fill etcd from outside the provider until it raises its NOSPACE alarm.
	cli, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	filler := strings.Repeat("x", 1<<20)
	for i := 0; ; i++ {
		if i > 64 {
			t.Fatal("etcd accepted 64 MiB over a 4 MiB quota")
		}
		if _, err := cli.Put(ctx, "/filler/"+string(rune('a'+i%26))+strings.Repeat("z", i/26), filler); err != nil {
			if !strings.Contains(err.Error(), "space") {
				t.Fatalf("filling etcd: %v", err)
			}
			break
		}
	}

	_, err = b.ctl(t, dir, s.url, "", "token", "create")
	if err == nil || !strings.Contains(err.Error(), "quota") || !strings.Contains(err.Error(), apiv1.CodeUnavailable) {
		t.Fatalf("token create on a full store: %v, want a refusal naming the quota", err)
	}
	var st apiv1.Status
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "Active" || st.Hosts != 1 {
		t.Fatalf("status on a full store = %+v", st)
	}
	if _, err := h.c.Release(ctx); !client.IsCode(err, apiv1.CodeUnavailable) {
		t.Fatalf("release on a full store: %v, want %s (the release cannot be audited)", err, apiv1.CodeUnavailable)
	}
	var hosts []apiv1.Host
	b.ctlJSON(t, dir, s.url, &hosts, "hosts")
	if len(hosts) != 1 || hosts[0].ID != h.id || len(before.KDKs) != 1 {
		t.Fatalf("hosts on a full store = %+v", hosts)
	}
}
