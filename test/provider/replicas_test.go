package provider_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/e2e"
)

// copyReplicaFiles gives a second replica the same root key and admin credentials.
func copyReplicaFiles(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{daemon.RootKeyFile, daemon.CACertFile, daemon.AdminCertFile, daemon.AdminKeyFile} {
		data, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, f), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestReplicasOnEtcd: two replicas share one etcd. A host revoked on one is refused at
// once on the other; when one replica is killed mid-run, hosts that fail over keep
// fetching from the other without a single failed fetch.
func TestReplicasOnEtcd(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	p := b.replicas(t)
	dirA, dirB, a, bb := p.dirA, p.dirB, p.a, p.b
	b.backUp(t, dirA, a.url)

	var st apiv1.Status
	b.ctlJSON(t, dirB, bb.url, &st, "status")
	if st.State != "Active" {
		t.Fatalf("replica B sees state %s after a backup through A", st.State)
	}

	// Revocation through A is seen by B on the very next request.
	victim := b.mustJoin(t, a, "kvm-victim")
	victimOnB := victim.clientFor(t, bb.url)
	if _, err := victimOnB.Release(ctx); err != nil {
		t.Fatalf("host enrolled on A fetching from B: %v", err)
	}
	b.mustCtl(t, dirA, a.url, "", "revoke", victim.id)
	if _, err := victimOnB.Release(ctx); !client.IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("host revoked on A, fetching from B: %v, want %s", err, apiv1.CodeHostRevoked)
	}

	// Hosts fetch from A with B as a replica (client failover); A is killed mid-run.
	const nHosts = 8
	hosts := make([]*client.Client, nHosts)
	for i := range hosts {
		h := b.mustJoin(t, a, "kvm-"+string(rune('a'+i)))
		c, err := client.New(client.Config{URL: a.url, Replicas: []string{bb.url}, CA: h.enr.CA, Certificate: h.enr.Certificate, Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		hosts[i] = c
	}
	var okBefore, okAfter, failed atomic.Int64
	var killed atomic.Bool
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, h := range hosts {
		wg.Add(1)
		go func(h *client.Client) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				fctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				_, err := h.Release(fctx)
				cancel()
				switch {
				case err != nil:
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				case killed.Load():
					okAfter.Add(1)
				default:
					okBefore.Add(1)
				}
			}
		}(h)
	}
	e2e.WaitFor(t, 60*time.Second, "50 fetches before the kill", func() bool { return okBefore.Load() >= 50 })
	killed.Store(true)
	a.kill()
	e2e.WaitFor(t, 60*time.Second, "50 fetches after the kill", func() bool { return okAfter.Load() >= 50 || failed.Load() > 0 })
	close(stop)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d fetches failed on both replicas; first: %v", n, firstErr.Load())
	}
	t.Logf("fetches: %d before the kill, %d after it (served by B)", okBefore.Load(), okAfter.Load())
	b.mustCtl(t, dirB, bb.url, "", "audit", "verify")
}
