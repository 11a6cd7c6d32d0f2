package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// Two replicas appending to one audit log at the same time keep one unbroken chain:
// the head is read and written in the same serialisable transaction.
func TestAuditOnTwoReplicas(t *testing.T) {
	requireEtcd(t)
	prefix := fmt.Sprintf("/test/%s/%d/", t.Name(), prefixes.Add(1))
	ctx := context.Background()
	replicas := []store.Store{openPrefix(t, prefix, shared.Endpoints()), openPrefix(t, prefix, shared.Endpoints())}
	defer replicas[0].Close()
	defer replicas[1].Close()
	const workers, each = 4, 10
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := replicas[w%2]
			for i := 0; i < each; i++ {
				err := s.Update(ctx, func(tx store.Tx) error {
					_, err := audit.Append(tx, audit.Event{Kind: audit.KindRelease, Actor: fmt.Sprintf("replica-%d", w%2), Subject: fmt.Sprintf("host-%d-%d", w, i)})
					return err
				})
				if err != nil {
					t.Errorf("append: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	err := replicas[1].View(ctx, func(tx store.Tx) error {
		if err := audit.Verify(tx); err != nil {
			return err
		}
		seq, _, err := audit.Head(tx)
		if err == nil && seq != workers*each {
			return fmt.Errorf("head at %d, want %d", seq, workers*each)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Two replicas on a three-member etcd keep committing while one member is killed: after
// the new leader is elected every update succeeds, and no committed update is lost.
func TestMemberKilledMidRun(t *testing.T) {
	e2e.Require(t, etcdtest.Binary)
	c := etcdtest.New(t, etcdtest.Config{Members: 3})
	ctx := context.Background()
	var replicas []*etcdstore.Store
	for i := 0; i < 2; i++ {
		s, err := etcdstore.Open(ctx, etcdstore.Config{Endpoints: c.Endpoints(), Prefix: "/nkp/", RequestTimeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		replicas = append(replicas, s)
	}
	var ok, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := replicas[w%2]
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := s.Update(ctx, func(tx store.Tx) error {
					v, err := tx.Get("ctr", "n")
					if err != nil && !errors.Is(err, store.ErrNotFound) {
						return err
					}
					n := 0
					fmt.Sscan(string(v), &n)
					return tx.Put("ctr", "n", []byte(fmt.Sprint(n+1)))
				})
				if err != nil {
					failed.Add(1)
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	e2e.WaitFor(t, 20*time.Second, "20 updates before the kill", func() bool { return ok.Load() >= 20 })
	if err := c.Members()[0].Kill(); err != nil {
		t.Fatal(err)
	}
	atKill := ok.Load()
	e2e.WaitFor(t, 30*time.Second, "50 more updates after killing a member", func() bool { return ok.Load() >= atKill+50 })
	close(stop)
	wg.Wait()
	var n int
	err := replicas[0].View(ctx, func(tx store.Tx) error {
		v, err := tx.Get("ctr", "n")
		if err == nil {
			_, err = fmt.Sscan(string(v), &n)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// A commit that timed out may have landed: the counter may exceed the successes by
	// at most the number of failed calls, never fall short of them.
	if int64(n) < ok.Load() || int64(n) > ok.Load()+failed.Load() {
		t.Fatalf("counter %d after %d successful and %d failed updates", n, ok.Load(), failed.Load())
	}
	t.Logf("%d updates committed, %d failed around the kill", ok.Load(), failed.Load())
}
