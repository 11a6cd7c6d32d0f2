package cli

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/state"
)

// TestApplyStateMode pins the libvirt case: swtpm_setup's run leaves 0640 state files,
// libvirt then starts the TPM with --tpmstate mode=0600, and the files must have that
// mode although package state overwrites an encrypted file in place.
func TestApplyStateMode(t *testing.T) {
	permall := state.FileName("permall")
	volatile := state.FileName("volatilestate")
	tests := []struct {
		name  string
		files map[string]os.FileMode // state files present before, with their modes
		mode  os.FileMode
		want  map[string]os.FileMode // modes after
	}{
		{
			name:  "swtpm_setup's 0640 narrowed to libvirt's 0600",
			files: map[string]os.FileMode{permall: 0o640, volatile: 0o644},
			mode:  0o600,
			want:  map[string]os.FileMode{permall: 0o600, volatile: 0o600},
		},
		{
			name:  "widened as swtpm's rename would",
			files: map[string]os.FileMode{permall: 0o600},
			mode:  0o640,
			want:  map[string]os.FileMode{permall: 0o640},
		},
		{
			name:  "backup copies too",
			files: map[string]os.FileMode{permall: 0o640, permall + ".bak": 0o640},
			mode:  0o600,
			want:  map[string]os.FileMode{permall: 0o600, permall + ".bak": 0o600},
		},
		{
			name:  "other files left alone",
			files: map[string]os.FileMode{".lock": 0o640, "notes.txt": 0o644},
			mode:  0o600,
			want:  map[string]os.FileMode{".lock": 0o640, "notes.txt": 0o644},
		},
		{
			name:  "empty directory",
			files: map[string]os.FileMode{},
			mode:  0o600,
			want:  map[string]os.FileMode{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, mode := range tt.files {
				p := filepath.Join(dir, name)
				if err := os.WriteFile(p, []byte("x"), mode); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(p, mode); err != nil { // past the umask
					t.Fatal(err)
				}
			}
			var logBuf bytes.Buffer
			applyStateMode(dir, tt.mode, slog.New(slog.NewTextHandler(&logBuf, nil)))
			for name, want := range tt.want {
				fi, err := os.Stat(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				if got := fi.Mode().Perm(); got != want {
					t.Errorf("%s: mode %#o, want %#o", name, got, want)
				}
			}
			if strings.Contains(logBuf.String(), "level=WARN") {
				t.Errorf("unexpected warning: %s", logBuf.String())
			}
		})
	}
}

// TestApplyStateModeLeavesLinks checks that a symbolic link named like a state file is
// not followed: its target keeps its mode (package state refuses the link itself).
func TestApplyStateModeLeavesLinks(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	target := filepath.Join(other, "target")
	if err := os.WriteFile(target, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(target, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, filepath.Join(dir, state.FileName("permall"))); err != nil {
		t.Fatal(err)
	}
	applyStateMode(dir, 0o600, slog.New(slog.DiscardHandler))
	fi, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("link target mode %#o, want 0644 (the link must not be followed)", fi.Mode().Perm())
	}
}
