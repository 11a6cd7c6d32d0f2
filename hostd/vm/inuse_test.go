package vm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

func TestOpeners(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "other-name.img")
	if err := os.Link(path, link); err != nil {
		t.Fatal(err)
	}
	closed, err := openers("/proc", path)
	if err != nil || len(closed) != 0 {
		t.Fatalf("a file nobody has open: %v %v", closed, err)
	}
	f, err := os.Open(link) // another name of the same file
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ps, err := openers("/proc", path)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || ps[0].PID != os.Getpid() || ps[0].Comm == "" {
		t.Fatalf("openers %v, want this process (%d)", ps, os.Getpid())
	}
	if _, err := openers(filepath.Join(dir, "no-proc"), path); err == nil {
		t.Fatal("no error for an unreadable proc directory")
	}
}

// TestFinalizeKeepsOpenFile: a VM resumed from a save image (or a snapshot) made before
// protect runs on the original file; finalize must not remove a file a process has open,
// and removes it once it is closed.
func TestFinalizeKeepsOpenFile(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "d1", uuid1, diskDevices(dir))
	ctx := context.Background()
	if _, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{Disks: "vda"}, nil); err != nil {
		t.Fatal(err)
	}
	orig := filepath.Join(dir, "vda.img")
	f, err := os.OpenFile(orig, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	v, err := e.m.Finalize(ctx, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orig); err != nil {
		t.Fatalf("finalize removed %s while this process has it open: %v", orig, err)
	}
	want := []string{orig + " is kept", "process " + strconv.Itoa(os.Getpid()), "has it open", "nkpctl vm protect --finalize d1 again"}
	if len(v.Problems) != 1 {
		t.Fatalf("problems %q, want one saying %q", v.Problems, want)
	}
	for _, w := range want {
		if !strings.Contains(v.Problems[0], w) {
			t.Errorf("problem %q does not say %q", v.Problems[0], w)
		}
	}
	if len(v.Disks) == 0 || len(v.Disks[0].Originals) != 1 {
		t.Fatalf("status after finalize: %+v, want the original still listed", v.Disks)
	}
	f.Close()
	if v, err = e.m.Finalize(ctx, "d1"); err != nil || len(v.Problems) != 0 {
		t.Fatalf("finalize after close: %+v %v", v.Problems, err)
	}
	if _, err := os.Stat(orig); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after finalize: %v", orig, err)
	}
}
