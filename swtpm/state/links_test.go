package state

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestHardLinks: a state file with a hard link from elsewhere is refused like a symbolic
// link; the links nkp-swtpm makes itself (the backup, its temporary name after a crash,
// damage evidence) still load.
func TestHardLinks(t *testing.T) {
	key := testKey(t, 3, 32)
	tests := []struct {
		name    string
		link    func(dir, p string) string // makes a second name of p
		wantErr string                     // "" loads
	}{
		{"from another directory", func(dir, p string) string { return filepath.Join(t.TempDir(), "stolen") }, "hard links"},
		{"another name in the directory", func(dir, p string) string { return filepath.Join(dir, "copy") }, "hard links"},
		{"backup (crash before the new file replaced it)", func(dir, p string) string { return p + ".bak" }, ""},
		{"backup's temporary name", func(dir, p string) string { return filepath.Join(dir, tempName("permall")+".bak") }, ""},
		{"damage evidence", func(dir, p string) string { return p + ".damaged.1700000000" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			d := mustOpen(t, dir, Options{Key: key})
			if err := d.Store("permall", []byte("the TPM's NV")); err != nil {
				t.Fatal(err)
			}
			d.Close()
			p := filepath.Join(dir, FileName("permall"))
			if err := os.Link(p, tt.link(dir, p)); err != nil {
				t.Fatal(err)
			}
			d = mustOpen(t, dir, Options{Key: key})
			got, err := d.Load("permall")
			if tt.wantErr == "" {
				if err != nil || string(got) != "the TPM's NV" {
					t.Errorf("Load = %q, %v; want the state", got, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), p) {
				t.Errorf("Load = %q, %v; want a refusal naming %s and %q", got, err, p, tt.wantErr)
			}
			if b, _ := os.ReadFile(p); len(b) == 0 {
				t.Error("the refused file was changed")
			}
		})
	}
}
