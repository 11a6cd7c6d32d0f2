package boltstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/test/e2e"
)

// mount runs mount(8) with args and registers the unmount; it skips (fails under
// NKP_E2E=required) where mounting is not allowed.
func mount(t *testing.T, target string, args ...string) {
	t.Helper()
	e2e.RequireRoot(t)
	e2e.Require(t, "mount", "umount")
	if out, err := exec.Command("mount", append(args, target)...).CombinedOutput(); err != nil {
		e2e.Unavailable(t, fmt.Sprintf("mount %v %s: %v: %s (needs CAP_SYS_ADMIN)", args, target, err, out))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", target).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", target, err, out)
		}
	})
}

// A store on a file system with no space left refuses the write with ErrFull, keeps
// what was committed before, and takes writes again once space is freed.
func TestDiskFull(t *testing.T) {
	dir := t.TempDir()
	mount(t, dir, "-t", "tmpfs", "-o", "size=2m", "tmpfs")
	path := filepath.Join(dir, "provider.db")
	s, err := boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }() // s is reopened below
	ctx := context.Background()
	if err := put(s, "first", "kept"); err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 128<<10)
	var werr error
	n := 0
	for ; n < 64; n++ {
		werr = s.Update(ctx, func(tx store.Tx) error { return tx.Put("b", fmt.Sprintf("chunk%02d", n), chunk) })
		if werr != nil {
			break
		}
	}
	if !errors.Is(werr, store.ErrFull) {
		t.Fatalf("after %d chunks of 128 KiB on a 2 MiB file system: %v, want ErrFull", n, werr)
	}
	t.Logf("refused after %d chunks: %v", n, werr)
	check := func(when string) {
		var v []byte
		err := s.View(ctx, func(tx store.Tx) (err error) { v, err = tx.Get("b", "first"); return err })
		if err != nil || string(v) != "kept" {
			t.Fatalf("%s: first value reads %q, %v", when, v, err)
		}
	}
	check("after ENOSPC")
	err = s.Update(ctx, func(tx store.Tx) error {
		for i := 0; i < n; i++ {
			if err := tx.Delete("b", fmt.Sprintf("chunk%02d", i)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("deleting to free space: %v", err)
	}
	if err := put(s, "after", "space freed"); err != nil {
		t.Fatalf("write after freeing space: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatalf("reopen after ENOSPC: %v", err)
	}
	check("after reopen")
}

// A store file on a read-only file system: a read-write open fails with ErrReadOnly and
// says so; a read-only open reads it.
func TestReadOnlyFileSystem(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "provider.db")
	s, err := boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := put(s, "k", "v"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	mount(t, dir, "--bind", "-o", "ro", dir)

	_, err = boltstore.Open(path, boltstore.Options{})
	if !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("read-write open on a read-only file system: %v, want ErrReadOnly", err)
	}
	ro, err := boltstore.Open(path, boltstore.Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open: %v", err)
	}
	defer ro.Close()
	var v []byte
	if err := ro.View(context.Background(), func(tx store.Tx) (err error) { v, err = tx.Get("b", "k"); return err }); err != nil || string(v) != "v" {
		t.Fatalf("read-only open reads %q, %v", v, err)
	}
}
