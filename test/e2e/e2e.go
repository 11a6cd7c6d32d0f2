// Package e2e holds the few helpers that nkp's end-to-end tests under test/ share:
// deciding whether a missing tool skips or fails a test, building a program of this
// module once per test binary (and removing it at the end: Main), and polling a condition with a bound instead of sleeping.
//
// Only test code imports it. A missing tool skips the test with a clear reason, unless
// the environment variable NKP_E2E is "required" (CI sets it): then it fails the test.
package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

// EnvRequired names the environment variable that turns skips into failures when it
// holds the value "required".
const EnvRequired = "NKP_E2E"

// EnvBin names the environment variable that points at a directory of prebuilt nkp
// programs (the Makefile's bin/); BuildBinary uses a program found there.
const EnvBin = "NKP_BIN"

// Required reports whether missing tools must fail the tests (NKP_E2E=required).
func Required() bool { return os.Getenv(EnvRequired) == "required" }

// Require checks that each tool is an executable in $PATH (or an absolute path). When one
// is missing the test is skipped with a reason naming it, or fails under NKP_E2E=required.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	var missing []string
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) > 0 {
		Unavailable(t, fmt.Sprintf("missing tools %v (install them with `make setup`)", missing))
	}
}

// RequireRoot skips (or fails under NKP_E2E=required) a test that needs uid 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root (run the end-to-end tests with sudo)")
	}
}

// Unavailable ends a test whose environment lacks something: a skip with the reason,
// or a failure under NKP_E2E=required.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if Required() {
		t.Fatalf("%s; %s=required makes this a failure", reason, EnvRequired)
	}
	t.Skip(reason)
}

// WaitFor polls cond every few milliseconds until it returns true, and fails the test
// naming what was awaited when timeout passes first.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// ErrTimeout is returned by Poll when the condition did not hold in time.
var ErrTimeout = errors.New("condition not met before the deadline")

// Poll is WaitFor without a testing.TB: it returns ErrTimeout (wrapped with the
// duration) when cond did not return true within timeout.
func Poll(timeout time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	delay := time.Millisecond
	for {
		if cond() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w (%v)", ErrTimeout, timeout)
		}
		time.Sleep(delay)
		if delay < 50*time.Millisecond {
			delay *= 2
		}
	}
}

var builds struct {
	sync.Mutex
	dir  string
	bins map[string]string
}

// BuildBinary returns the path of the program built from pkg, a package path inside this
// module such as "./cmd/nkp-swtpm". If $NKP_BIN holds a program of that name it is used
// as is; otherwise the program is built with `go build` once per test binary into a
// temporary directory that Cleanup removes; nkp-hook with the flags the Makefile gives it.
func BuildBinary(t testing.TB, pkg string) string {
	t.Helper()
	name := filepath.Base(pkg)
	if dir := os.Getenv(EnvBin); dir != "" {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	builds.Lock()
	defer builds.Unlock()
	if p, ok := builds.bins[pkg]; ok {
		return p
	}
	root, err := ModuleRoot()
	if err != nil {
		t.Fatalf("build %s: %v", pkg, err)
	}
	if builds.dir == "" {
		d, err := os.MkdirTemp("", "nkp-e2e-bin-")
		if err != nil {
			t.Fatalf("build %s: temporary directory: %v", pkg, err)
		}
		builds.dir = d
		builds.bins = map[string]string{}
	}
	out := filepath.Join(builds.dir, name)
	args := []string{"build", "-o", out}
	if pkg == "./cmd/nkp-hook" && runtime.GOOS == "linux" && runtime.GOARCH == "amd64" {
		args = append(args, "-ldflags=-E=main.entry") // as the Makefile builds it (go doc ./cmd/nkp-hook)
	}
	cmd := exec.Command("go", append(args, pkg)...)
	cmd.Dir = root
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, buf.String())
	}
	builds.bins[pkg] = out
	return out
}

// Cleanup removes what BuildBinary built. Call it from TestMain after m.Run (Main
// does), when the package's TestMain has more to do.
func Cleanup() {
	builds.Lock()
	defer builds.Unlock()
	if builds.dir != "" {
		os.RemoveAll(builds.dir)
		builds.dir, builds.bins = "", nil
	}
}

// Main is the TestMain of a package whose tests build programs with BuildBinary: it
// runs the tests, removes what they built and exits with the tests' code.
//
//	func TestMain(m *testing.M) { e2e.Main(m) }
func Main(m *testing.M) {
	code := m.Run()
	Cleanup()
	os.Exit(code)
}

// ModuleRoot returns the directory holding this module's go.mod, found by walking up
// from the working directory (go test runs in the package directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("module root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("module root: no go.mod above the working directory; run the tests from inside the repository")
		}
		dir = parent
	}
}

// TraversableDir makes a new directory under the system's temporary directory, named
// with prefix, that other users may traverse but not list (mode 0711), and removes it
// with its contents at the end of the test. t.TempDir's 0700 would keep out the users a
// test's files are for (QEMU's, the vTPM's), who open known paths inside.
func TraversableDir(t testing.TB, prefix string) string {
	t.Helper()
	d, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chmod(d, 0o711); err != nil {
		t.Fatal(err)
	}
	return d
}

// KillListener shuts a listening TCP socket down under whoever accepts on it, as a
// dying listener would: their blocked accept(2) fails with EINVAL, and so does every
// later one, in this process and in any that inherited the socket.
func KillListener(t testing.TB, ln *net.TCPListener) {
	t.Helper()
	rc, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = syscall.Shutdown(int(fd), syscall.SHUT_RDWR) }); err != nil || serr != nil {
		t.Fatalf("shutdown(2) of the listener %s: %v %v", ln.Addr(), err, serr)
	}
}
