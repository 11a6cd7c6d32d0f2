package storetest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/nkp-dev/nkp/provider/store"
)

// Benchmark measures s with the access patterns of the provider: a single writer
// (Put), writers on distinct keys in parallel (PutParallel), read-modify-write of one hot
// key in parallel (HotKeyParallel, as the audit log's head) and reads (Get). The
// parallel ones run 8 goroutines per CPU, as many hosts calling at once.
func Benchmark(b *testing.B, s store.Store) {
	ctx := context.Background()
	value := make([]byte, 512) // about a host record
	b.Run("Put", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put("bench", strconv.Itoa(i), value) }); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("PutParallel", func(b *testing.B) {
		var n atomic.Int64
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k := fmt.Sprintf("p%d", n.Add(1))
				if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put("bench", k, value) }); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("HotKeyParallel", func(b *testing.B) {
		var conflicts atomic.Int64
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				err := s.Update(ctx, func(tx store.Tx) error {
					v, err := tx.Get("bench", "hot")
					if err != nil && !errors.Is(err, store.ErrNotFound) {
						return err
					}
					n, _ := strconv.Atoi(string(v))
					return tx.Put("bench", "hot", []byte(strconv.Itoa(n+1)))
				})
				if errors.Is(err, store.ErrConflict) {
					conflicts.Add(1)
				} else if err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(conflicts.Load()), "gave-up")
	})
	b.Run("Get", func(b *testing.B) {
		for b.Loop() {
			if err := s.View(ctx, func(tx store.Tx) error { _, err := tx.Get("bench", "p1"); return err }); err != nil {
				b.Fatal(err)
			}
		}
	})
}
