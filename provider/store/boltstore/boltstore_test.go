package boltstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/provider/store/storetest"
)

func open(t *testing.T, path string, opts boltstore.Options) *boltstore.Store {
	t.Helper()
	s, err := boltstore.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestContract(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) store.Store {
			return open(t, filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{})
		},
		Full: func(t *testing.T) store.Store {
			return open(t, filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{MaxSize: 4 << 20})
		},
		Reopen: func(t *testing.T, s store.Store) store.Store {
			path := s.(*boltstore.Store).Path()
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			return open(t, path, boltstore.Options{})
		},
		SnapshotViews: true,
	})
}

func put(s store.Store, k, v string) error {
	return s.Update(context.Background(), func(tx store.Tx) error { return tx.Put("b", k, []byte(v)) })
}

func TestFileMode(t *testing.T) {
	cases := []struct {
		name   string
		before os.FileMode // 0: no file yet
	}{
		{"new file", 0},
		{"world-readable file narrowed", 0o644},
		{"already private", 0o600},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "provider.db")
			if c.before != 0 {
				s := open(t, path, boltstore.Options{})
				if err := put(s, "k", "v"); err != nil {
					t.Fatal(err)
				}
				s.Close()
				if err := os.Chmod(path, c.before); err != nil {
					t.Fatal(err)
				}
			}
			s := open(t, path, boltstore.Options{})
			defer s.Close()
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Fatalf("store file mode %v, want 0600", fi.Mode().Perm())
			}
		})
	}
}

func TestReadOnlyOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "provider.db")
	s := open(t, path, boltstore.Options{})
	if err := put(s, "k", "v"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	ro := open(t, path, boltstore.Options{ReadOnly: true})
	defer ro.Close()
	if err := put(ro, "k", "w"); !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("Update on a read-only open: %v, want ErrReadOnly", err)
	}
	var got []byte
	err := ro.View(context.Background(), func(tx store.Tx) (err error) { got, err = tx.Get("b", "k"); return err })
	if err != nil || string(got) != "v" {
		t.Fatalf("read-only View: %q, %v", got, err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("not a bbolt file ", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	locked := filepath.Join(dir, "locked.db")
	holder := open(t, locked, boltstore.Options{})
	defer holder.Close()

	cases := []struct {
		name string
		path string
		opts boltstore.Options
		want string
	}{
		{"not a bbolt file", garbage, boltstore.Options{}, "not a bbolt store file"},
		{"locked by another opener", locked, boltstore.Options{LockTimeout: 100 * time.Millisecond}, "locked by another process"},
		{"a directory", dir, boltstore.Options{}, "not a regular file"},
		{"missing, read-only", filepath.Join(dir, "none.db"), boltstore.Options{ReadOnly: true}, "cannot open read-only"},
		{"missing directory", filepath.Join(dir, "no", "such", "provider.db"), boltstore.Options{}, "no such file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			s, err := boltstore.Open(c.path, c.opts)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.path) {
				t.Fatalf("Open = %v; want an error naming %s and saying %q", err, c.path, c.want)
			}
			if time.Since(start) > 5*time.Second {
				t.Fatalf("Open took %v to fail", time.Since(start))
			}
		})
	}
}

func BenchmarkStore(b *testing.B) {
	s, err := boltstore.Open(filepath.Join(b.TempDir(), "provider.db"), boltstore.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	storetest.Benchmark(b, s)
}

// When a batch's commit fails for lack of space, each Update runs again alone: the small
// ones land and only the one too large for the file fails with ErrFull.
func TestFullBatchRunsAlone(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{MaxSize: 1 << 20})
	defer s.Close()
	big := make([]byte, 2<<20)
	const small = 16
	errs := make(chan error, small)
	bigErr := make(chan error, 1)
	go func() {
		bigErr <- s.Update(context.Background(), func(tx store.Tx) error { return tx.Put("b", "big", big) })
	}()
	for i := 0; i < small; i++ {
		go func() {
			errs <- s.Update(context.Background(), func(tx store.Tx) error {
				return tx.Put("b", "small"+string(rune('a'+i)), []byte("v"))
			})
		}()
	}
	for i := 0; i < small; i++ {
		if err := <-errs; err != nil {
			t.Errorf("small update: %v", err)
		}
	}
	if err := <-bigErr; !errors.Is(err, store.ErrFull) {
		t.Fatalf("2 MiB into a 1 MiB store: %v, want ErrFull", err)
	}
	n := 0
	err := s.View(context.Background(), func(tx store.Tx) error {
		return tx.List("b", "", func(string, []byte) error { n++; return nil })
	})
	if err != nil || n != small {
		t.Fatalf("%d keys (%v), want the %d small ones", n, err, small)
	}
}

// A panic in one Update's function reaches its caller, writes nothing, and leaves the
// store working for the others.
func TestPanicInUpdate(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{})
	defer s.Close()
	got := func() (p any) {
		defer func() { p = recover() }()
		_ = s.Update(context.Background(), func(tx store.Tx) error {
			_ = tx.Put("b", "half", []byte("x"))
			panic("boom")
		})
		return nil
	}()
	if got != "boom" {
		t.Fatalf("recovered %v, want the function's panic", got)
	}
	if err := put(s, "after", "ok"); err != nil {
		t.Fatalf("Update after a panic: %v", err)
	}
	err := s.View(context.Background(), func(tx store.Tx) error {
		if _, err := tx.Get("b", "half"); !errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("the panicking function's write: %v", err)
		}
		_, err := tx.Get("b", "after")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// An Update whose context ends while it waits behind a busy writer returns at once with
// the context's error and never runs.
func TestCancelWhileQueued(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{})
	defer s.Close()
	release := make(chan struct{})
	started := make(chan struct{})
	go func() {
		_ = s.Update(context.Background(), func(tx store.Tx) error {
			close(started)
			<-release // holds the writer
			return nil
		})
	}()
	<-started
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{}, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- s.Update(ctx, func(tx store.Tx) error { ran <- struct{}{}; return nil })
	}()
	cancel()
	err := <-errc
	close(release)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("queued Update after cancel: %v, want context.Canceled", err)
	}
	select {
	case <-ran:
		t.Fatal("the cancelled Update ran")
	default:
	}
}
