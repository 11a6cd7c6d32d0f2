package mem_test

import (
	"context"
	"errors"
	"testing"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/provider/store/storetest"
)

func TestContract(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(*testing.T) store.Store { return mem.New() },
		Full: func(*testing.T) store.Store {
			s := mem.New()
			s.SetQuota(2 << 20)
			return s
		},
	})
}

func TestReadOnly(t *testing.T) {
	s := mem.New()
	ctx := context.Background()
	if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put("b", "k", []byte("v")) }); err != nil {
		t.Fatal(err)
	}
	s.SetReadOnly(true)
	err := s.Update(ctx, func(tx store.Tx) error { return tx.Put("b", "k", []byte("w")) })
	if !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("Update on a read-only store: %v, want ErrReadOnly", err)
	}
	var got []byte
	if err := s.View(ctx, func(tx store.Tx) (err error) { got, err = tx.Get("b", "k"); return err }); err != nil || string(got) != "v" {
		t.Fatalf("read-only store reads %q, %v; want v", got, err)
	}
	s.SetReadOnly(false)
	if err := s.Update(ctx, func(tx store.Tx) error { return tx.Put("b", "k", []byte("w")) }); err != nil {
		t.Fatalf("Update after SetReadOnly(false): %v", err)
	}
}

func TestTxAfterReturn(t *testing.T) {
	s := mem.New()
	var kept store.Tx
	if err := s.Update(context.Background(), func(tx store.Tx) error { kept = tx; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := kept.Put("b", "k", nil); err == nil {
		t.Fatal("Put on a finished transaction succeeded")
	}
}

func BenchmarkStore(b *testing.B) { storetest.Benchmark(b, mem.New()) }
