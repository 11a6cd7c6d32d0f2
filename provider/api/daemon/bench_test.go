package daemon_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// BenchmarkRelease measures one host fetching its KDKs over a kept-alive mTLS connection
// from an in-process provider on bbolt, and on a real etcd (server and client share the
// process; etcd runs beside it). The fetches after the first are read-only (the release
// audit window covers them).
func BenchmarkRelease(b *testing.B) {
	for _, kind := range []string{daemon.StoreBolt, daemon.StoreEtcd} {
		b.Run(kind, func(b *testing.B) {
			sc := daemon.StoreConfig{Kind: kind}
			if kind == daemon.StoreEtcd {
				sc.EtcdEndpoints = etcdtest.New(b, etcdtest.Config{}).Endpoints()
			}
			benchmarkRelease(b, sc)
		})
	}
}

func benchmarkRelease(b *testing.B, sc daemon.StoreConfig) {
	ctx := context.Background()
	dir := filepath.Join(b.TempDir(), "p")
	if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Store: sc, Log: quiet()}); err != nil {
		b.Fatal(err)
	}
	d, err := daemon.Start(ctx, daemon.Config{Dir: dir, Store: sc, Listen: "127.0.0.1:0", Log: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Shutdown(ctx)
	info, err := d.Provider().Backup(ctx, io.Discard, []byte("pw: correct horse battery"))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := d.Provider().ConfirmBackup(ctx, info.SHA256); err != nil {
		b.Fatal(err)
	}
	tok, err := d.Provider().CreateToken(ctx, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	pin, err := d.Provider().CAHash(ctx)
	if err != nil {
		b.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	enr, err := client.Join(ctx, client.JoinRequest{URL: d.URL(), Token: tok.Secret, CAHash: pin, Hostname: "h", Key: key})
	if err != nil {
		b.Fatal(err)
	}
	c, err := client.New(client.Config{URL: d.URL(), CA: enr.CA, Certificate: enr.Certificate})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Release(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
