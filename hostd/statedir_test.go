package hostd

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestStateDirReadOnly: nkp-hostd started on a read-only state directory says which
// directory, why it must be writable, and what to do.
func TestStateDirReadOnly(t *testing.T) {
	dir := t.TempDir()
	if err := makeDirs(dir); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Skipf("bind mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Skipf("read-only remount: %v", err)
	}
	err := makeDirs(dir)
	if err == nil {
		t.Fatal("no error on a read-only state directory")
	}
	for _, w := range []string{"state directory " + dir, "read-only file system", "needs it writable", "--state-dir"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
}
