package cli

import (
	"context"
	"errors"
	"io/fs"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/state"
)

func TestLazyDirWaitsForTheLock(t *testing.T) {
	dir := t.TempDir()
	holder, err := state.Open(dir, state.Options{})
	if err != nil {
		t.Fatal(err)
	}
	l := &lazyDir{ctx: context.Background(), dir: dir}
	defer l.Close()
	if err := l.ReleaseLock(); err != nil {
		t.Fatalf("ReleaseLock before the first use: %v", err)
	}
	done := make(chan error, 1)
	go func() { _, err := l.Load("permall"); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("Load returned while another holder has the lock: %v", err)
	case <-time.After(50 * time.Millisecond): // bound of a negative check, not synchronisation
	}
	holder.Close()
	select {
	case err := <-done:
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Load after the holder left = %v, want a missing-blob error", err)
		}
	case <-time.After(incomingLockWait):
		t.Fatal("Load did not take the released lock")
	}
	if err := l.Store("permall", []byte("x")); err != nil {
		t.Fatalf("Store through the opened directory: %v", err)
	}
	if b, err := l.Load("permall"); err != nil || string(b) != "x" {
		t.Fatalf("Load = %q, %v; want x", b, err)
	}
}

func TestLazyDirGivesUp(t *testing.T) {
	tests := []struct {
		name   string
		cancel bool
		want   error
	}{
		{"context ends", true, context.Canceled},
		{"lock never released", false, state.ErrLocked},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			holder, err := state.Open(dir, state.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer holder.Close()
			ctx, cancel := context.WithCancel(context.Background())
			if tt.cancel {
				cancel()
			}
			defer cancel()
			l := &lazyDir{ctx: ctx, dir: dir}
			if tt.cancel {
				_, err = l.Load("permall")
			} else {
				err = l.LockStorage(ctx, 3) // bounded: 3 retries, 10 ms apart
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}
