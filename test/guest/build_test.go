package guest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestCpioListsWithCpio checks the archive writer against the cpio tool.
func TestCpioListsWithCpio(t *testing.T) {
	e2e.Require(t, "cpio")
	var buf bytes.Buffer
	if err := writeCpio(&buf, []byte("bb"), []byte("agent"), make([][]byte, len(Modules))); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-itv", "--quiet")
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -itv: %v\n%s", err, out)
	}
	listing := string(out)
	tests := []struct{ name, modePrefix string }{
		{"init", "-rwxr-xr-x"},
		{"bin/busybox", "-rwxr-xr-x"},
		{"bin/nkp-guest-agent", "-rwxr-xr-x"},
		{"bin/sh -> busybox", "lrwxrwxrwx"},
		{"dev/console", "crw-------"},
		{"lib/modules/virtio_blk.ko", "-rw-r--r--"},
		{"proc", "drwxr-xr-x"},
	}
	for _, tc := range tests {
		found := false
		for _, line := range strings.Split(listing, "\n") {
			if strings.HasSuffix(line, " "+tc.name) && strings.HasPrefix(line, tc.modePrefix) {
				found = true
			}
		}
		if !found {
			t.Errorf("cpio listing lacks %s with mode %s:\n%s", tc.name, tc.modePrefix, listing)
		}
	}
}

// TestBuild builds (or reuses) the real guest in the default cache directory, then checks
// that a second Build reuses it without rewriting anything.
func TestBuild(t *testing.T) {
	e2e.Require(t, "apt-cache", "apt-get", "dpkg-deb", Busybox)
	dir, err := DefaultDir()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	a, err := Build(ctx, dir)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	checks := []struct {
		path  string
		off   int
		magic string
	}{
		{a.Kernel, 0x202, "HdrS"}, // x86 boot protocol header of a bzImage
		{a.Initrd, 0, "\x1f\x8b"}, // gzip
	}
	for _, c := range checks {
		b, err := os.ReadFile(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) < c.off+len(c.magic) || string(b[c.off:c.off+len(c.magic)]) != c.magic {
			t.Errorf("%s: no %q at offset %#x", c.path, c.magic, c.off)
		}
	}
	st1, _ := os.Stat(a.Initrd)
	b, err := Build(ctx, dir)
	if err != nil {
		t.Fatalf("second Build: %v", err)
	}
	if b != a {
		t.Errorf("second Build = %+v, want the same artifacts %+v", b, a)
	}
	st2, _ := os.Stat(b.Initrd)
	if !st2.ModTime().Equal(st1.ModTime()) {
		t.Errorf("second Build rewrote %s", filepath.Base(b.Initrd))
	}
}

func TestCheckStatic(t *testing.T) {
	tests := []struct {
		path    string
		wantErr string
	}{
		{Busybox, ""},                     // Debian's busybox-static
		{"/bin/sh", "dynamically linked"}, // dash, linked against libc
		{"build.go", "bad magic"},         // not ELF at all
		{"no-such-file", "no such file"},
	}
	for _, tc := range tests {
		if _, err := os.Stat(tc.path); err != nil && tc.wantErr != "no such file" {
			t.Logf("%s missing, case skipped", tc.path)
			continue
		}
		err := checkStatic(tc.path)
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("checkStatic(%s) = %v, want error containing %q", tc.path, err, tc.wantErr)
		}
	}
}
