package daemon_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/api/daemon"
)

// TestProviderDirChecked: serve refuses a provider directory open to group or others,
// a secret file open to them, and a secret file that is a symbolic link, each with a
// sentence naming the file, the reason and the fix; nkpctl's LoadAdmin refuses an
// admin.key others can read; init refuses to use an existing directory open to others.
func TestProviderDirChecked(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name  string
		spoil func(t *testing.T, dir string) string // returns the path the error must name
		want  []string
	}{
		{"directory 0777", chmodded("", 0o777), []string{"mode 0777", "chmod 700"}},
		{"directory group-writable", chmodded("", 0o770), []string{"mode 0770", "chmod 700"}},
		{"directory world-readable", chmodded("", 0o755), []string{"mode 0755", "chmod 700"}},
		{"admin.key 0644", chmodded(daemon.AdminKeyFile, 0o644), []string{"admin key", "mode 0644", "chmod 600"}},
		{"provider.db 0640", chmodded(daemon.StoreFile, 0o640), []string{"store", "mode 0640", "chmod 600"}},
		{"provider.db a symlink", linkedAway(daemon.StoreFile), []string{"symbolic link", "mv "}},
		{"root.key a symlink", linkedAway(daemon.RootKeyFile), []string{"symbolic link", "mv "}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "p")
			if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err != nil {
				t.Fatal(err)
			}
			named := tc.spoil(t, dir)
			d, err := daemon.Start(ctx, daemon.Config{Dir: dir, Listen: "127.0.0.1:0", Log: quiet()})
			if err == nil {
				d.Shutdown(ctx)
				t.Fatal("Start accepted the spoiled directory")
			}
			for _, want := range append(tc.want, named) {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("Start: %v; want a sentence with %q", err, want)
				}
			}
		})
	}

	t.Run("nkpctl's admin.key 0644", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "p")
		if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err != nil {
			t.Fatal(err)
		}
		key := filepath.Join(dir, daemon.AdminKeyFile)
		chmod(t, key, 0o644)
		if _, err := daemon.LoadAdmin(dir); err == nil || !strings.Contains(err.Error(), "chmod 600 "+key) {
			t.Fatalf("LoadAdmin with admin.key 0644: %v, want a refusal saying chmod 600 %s", err, key)
		}
	})
	t.Run("init into an existing 0777 directory", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "p")
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		chmod(t, dir, 0o777)
		if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err == nil || !strings.Contains(err.Error(), "chmod 700 "+dir) {
			t.Fatalf("Init into a 0777 directory: %v, want a refusal saying chmod 700", err)
		}
		if left, _ := os.ReadDir(dir); len(left) != 0 {
			t.Fatalf("the refused init left %v", left)
		}
	})
}

// chmodded is a spoil of TestProviderDirChecked: it sets mode on dir/name (on dir when
// name is "") and returns that path.
func chmodded(name string, mode os.FileMode) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		p := filepath.Join(dir, name)
		chmod(t, p, mode)
		return p
	}
}

// linkedAway is a spoil of TestProviderDirChecked: it moves dir/name to another
// directory, leaves a symbolic link to it in its place and returns the link's path.
func linkedAway(name string) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		p := filepath.Join(dir, name)
		elsewhere := filepath.Join(t.TempDir(), name)
		if err := os.Rename(p, elsewhere); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(elsewhere, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}
