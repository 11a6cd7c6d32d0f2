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
)

// BenchmarkRelease measures one host fetching its KDKs over a kept-alive mTLS connection
// from an in-process provider on bbolt (server and client share the process).
func BenchmarkRelease(b *testing.B) {
	ctx := context.Background()
	dir := filepath.Join(b.TempDir(), "p")
	if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err != nil {
		b.Fatal(err)
	}
	d, err := daemon.Start(ctx, daemon.Config{Dir: dir, Listen: "127.0.0.1:0", Log: quiet(), BackupWorkFactor: 10})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Shutdown(ctx)
	info, err := d.Provider().Backup(ctx, io.Discard, []byte("pw"))
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
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	enr, err := client.Join(ctx, client.JoinRequest{URL: d.URL(), Token: tok.Secret, CAHash: d.Provider().CAHash(), Hostname: "h", Key: key})
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
