package state

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOpenAppliesMode pins the libvirt case: swtpm_setup's run leaves 0640 state files,
// libvirt then starts the TPM with --tpmstate mode=0600, and the files must have that
// mode although a Dir overwrites an encrypted file in place. It holds whether the lock
// is taken by Open or, for an incoming migration, later by LockStorage.
func TestOpenAppliesMode(t *testing.T) {
	permall, volatile := FileName("permall"), FileName("volatilestate")
	tests := []struct {
		name  string
		files map[string]os.FileMode // files present before, with their modes
		mode  os.FileMode            // Options.Mode
		want  map[string]os.FileMode // modes after the lock is taken
	}{
		{"swtpm_setup's 0640 narrowed to libvirt's 0600",
			map[string]os.FileMode{permall: 0o640, volatile: 0o644}, 0o600,
			map[string]os.FileMode{permall: 0o600, volatile: 0o600}},
		{"widened as swtpm's rename would",
			map[string]os.FileMode{permall: 0o600}, 0o640,
			map[string]os.FileMode{permall: 0o640}},
		{"backup copies too",
			map[string]os.FileMode{permall: 0o640, permall + ".bak": 0o640}, 0o600,
			map[string]os.FileMode{permall: 0o600, permall + ".bak": 0o600}},
		{"the state ID file too",
			map[string]os.FileMode{permall: 0o640, stateIDFile: 0o640}, 0o600,
			map[string]os.FileMode{permall: 0o600, stateIDFile: 0o600}},
		{"other files left alone",
			map[string]os.FileMode{"notes.txt": 0o644}, 0o600,
			map[string]os.FileMode{"notes.txt": 0o644}},
		{"no mode given: files left alone",
			map[string]os.FileMode{permall: 0o600, volatile: 0o644}, 0,
			map[string]os.FileMode{permall: 0o600, volatile: 0o644}},
	}
	for _, tt := range tests {
		for _, deferred := range []bool{false, true} {
			name := tt.name
			if deferred {
				name += "/LockStorage"
			}
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				for f, mode := range tt.files {
					p := filepath.Join(dir, f)
					content := []byte("x")
					if f == stateIDFile {
						content = []byte(strings.Repeat("ab", stateIDSize) + "\n")
					}
					if err := os.WriteFile(p, content, mode); err != nil {
						t.Fatal(err)
					}
					if err := os.Chmod(p, mode); err != nil { // past the umask
						t.Fatal(err)
					}
				}
				var logBuf bytes.Buffer
				d, err := Open(dir, Options{Mode: tt.mode, DeferLock: deferred, Log: slog.New(slog.NewTextHandler(&logBuf, nil))})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				if deferred {
					// Nothing changes before the lock: the source may still run.
					for f, mode := range tt.files {
						if got := perm(t, filepath.Join(dir, f)); got != mode {
							t.Errorf("%s before LockStorage: mode %#o, want %#o untouched", f, got, mode)
						}
					}
					if err := d.LockStorage(context.Background(), 0); err != nil {
						t.Fatal(err)
					}
				}
				for f, want := range tt.want {
					if got := perm(t, filepath.Join(dir, f)); got != want {
						t.Errorf("%s: mode %#o, want %#o", f, got, want)
					}
				}
				if strings.Contains(logBuf.String(), "--tpmstate mode=") && strings.Contains(logBuf.String(), "level=WARN") {
					t.Errorf("unexpected warning: %s", logBuf.String())
				}
			})
		}
	}
}

// TestOpenModeLeavesLinks: a symbolic link named like a state file is not followed; its
// target keeps its mode (Load refuses the link itself).
func TestOpenModeLeavesLinks(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	target := filepath.Join(other, "target")
	if err := os.WriteFile(target, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(target, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, filepath.Join(dir, FileName("permall"))); err != nil {
		t.Fatal(err)
	}
	d, err := Open(dir, Options{Mode: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := perm(t, target); got != 0o644 {
		t.Errorf("link target mode %#o, want 0644 (the link must not be followed)", got)
	}
}

func perm(t *testing.T, p string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// TestModeDoesNotFollowLinks: a state file name that is a symlink (planted by whoever
// else can write the directory) never has its target's mode changed.
func TestModeDoesNotFollowLinks(t *testing.T) {
	dir, outside := t.TempDir(), filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(outside, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(outside, 0o644)
	for _, name := range []string{FileName("permall"), FileName("volatilestate") + ".bak", stateIDFile} {
		if err := os.Symlink(outside, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	d, err := Open(dir, Options{Mode: 0o600, Log: slog.New(slog.DiscardHandler)})
	if err == nil {
		d.Close()
	}
	if got := perm(t, outside); got != 0o644 {
		t.Fatalf("the symlink's target got mode %#o: the mode was applied through a link", got)
	}
}
