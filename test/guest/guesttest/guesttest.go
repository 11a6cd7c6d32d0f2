// Package guesttest hands nkp's end-to-end tests the test guest (package guest): Require
// checks for root and the tools a VM test needs, then builds the guest once per test
// binary; CopyFile copies its kernel and initrd where QEMU's user may read them;
// ConsoleRecords and ConsoleTail read what it printed on its serial console file.
//
// Only test code imports it. A missing tool skips the test, or fails it under
// NKP_E2E=required (see package e2e).
package guesttest

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
)

// Tools are the programs every VM test needs: QEMU and the guest builder's.
var Tools = []string{"qemu-system-x86_64", "apt-cache", "apt-get", "dpkg-deb", guest.Busybox}

// BuildTimeout bounds the one build of the guest (a cold cache downloads the kernel).
const BuildTimeout = 15 * time.Minute

var built struct {
	sync.Mutex
	a   guest.Artifacts
	err error
	ok  bool
}

// Require checks that the test runs as root and that Tools and the extra tools are
// installed (skipping or failing as package e2e decides), then returns the guest, built
// under guest.DefaultDir once per test binary: a failed build fails this test and every
// later one with the same error.
func Require(t *testing.T, tools ...string) guest.Artifacts {
	t.Helper()
	e2e.RequireRoot(t)
	e2e.Require(t, append(append([]string{}, Tools...), tools...)...)
	built.Lock()
	defer built.Unlock()
	if !built.ok {
		dir, err := guest.DefaultDir()
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), BuildTimeout)
			built.a, err = guest.Build(ctx, dir)
			cancel()
		}
		built.err, built.ok = err, true
	}
	if built.err != nil {
		t.Fatalf("build the test guest: %v", built.err)
	}
	return built.a
}

// CopyFile copies from to to (created or truncated, mode 0644: QEMU's user reads it),
// failing the test on any error. Tests copy the guest's kernel and initrd out of the
// shared cache this way because libvirt relabels the files a domain boots.
func CopyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// ConsoleRecords reads the guest's records from the serial console file at path, as
// far as the guest has written it (none when the file does not exist yet).
func ConsoleRecords(path string) []guest.Record {
	b, _ := os.ReadFile(path)
	return guest.ParseConsole(b)
}

// ConsoleTail is the end of the console file at path (its last 3000 bytes) under a
// heading naming it, for a failing test's message.
func ConsoleTail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return fmt.Sprintf("--- console %s ---\n%s", path, b)
}
