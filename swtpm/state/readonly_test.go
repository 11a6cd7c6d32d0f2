package state

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestReadOnlyDir: a directory the TPM cannot write to is refused at Open, with a
// message saying so, not at the first write. Root ignores permission bits, so as root
// the directory is made immutable (chattr +i) or bind-mounted read-only; otherwise
// chmod 0500 does.
func TestReadOnlyDir(t *testing.T) {
	tests := []struct {
		name       string
		root       bool // the way needs root; the other way needs non-root
		make, undo func(dir string) error
	}{
		{"chmod 0500", false,
			func(dir string) error { return os.Chmod(dir, 0o500) },
			func(dir string) error { return os.Chmod(dir, 0o700) }},
		{"chattr +i", true,
			func(dir string) error { return run("chattr", "+i", dir) },
			func(dir string) error { return run("chattr", "-i", dir) }},
		{"read-only bind mount", true,
			func(dir string) error {
				if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
					return err
				}
				return unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
			},
			func(dir string) error { return unix.Unmount(dir, 0) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.root != (os.Geteuid() == 0) {
				t.Skipf("%s does not make a directory read-only for euid %d", tt.name, os.Geteuid())
			}
			dir := t.TempDir()
			if err := os.WriteFile(dir+"/tpm2-00.permall", []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := tt.make(dir); err != nil {
				e2e.Unavailable(t, "cannot make a read-only directory here with "+tt.name+": "+err.Error())
			}
			t.Cleanup(func() {
				if err := tt.undo(dir); err != nil {
					t.Errorf("undo %s: %v", tt.name, err)
				}
			})
			d, err := Open(dir, Options{})
			if err == nil {
				d.Close()
				t.Fatal("Open accepted a read-only state directory")
			}
			for _, want := range []string{dir, "not writable", "read-write"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("message %q lacks %q", err, want)
				}
			}
			if b, _ := os.ReadFile(dir + "/tpm2-00.permall"); string(b) != "x" {
				t.Errorf("the state file changed")
			}
		})
	}
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return &runError{name, err, string(out)}
	}
	return nil
}

type runError struct {
	name string
	err  error
	out  string
}

func (e *runError) Error() string {
	return e.name + ": " + e.err.Error() + ": " + strings.TrimSpace(e.out)
}
