package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// checkDir refuses a provider directory that group or others can use: it holds the root
// key, the store and the admin key, and a directory others may write to lets them swap
// any of those files (rename over them) even where the files themselves are 0600. A
// missing directory passes (Init and Restore make it 0700).
func checkDir(dir string) error {
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("provider directory %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("provider directory %s is not a directory; give --dir a directory (made 0700 by init)", dir)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("provider directory %s has mode %04o: group or others may list or change the files that hold the root key, the store and the admin key; run chmod 700 %s", dir, perm, dir)
	}
	return nil
}

// checkSecretFile refuses a secret file in the provider directory that is a symbolic
// link, not a regular file, or open to group or others; what names it in the sentence. A
// missing file passes (the caller decides whether it must exist).
func checkSecretFile(path, what string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	switch {
	case st.Mode()&fs.ModeSymlink != 0:
		target, _ := os.Readlink(path)
		return fmt.Errorf("%s %s is a symbolic link (to %s): a link lets whoever controls its target choose the file the provider uses; put the file itself in the provider directory (mv %s %s), mode 0600", what, path, target, target, path)
	case !st.Mode().IsRegular():
		return fmt.Errorf("%s %s is not a regular file (mode %s); put the file itself there, mode 0600", what, path, st.Mode())
	case st.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("%s %s has mode %04o: group or others may read or change it; run chmod 600 %s", what, path, st.Mode().Perm(), path)
	}
	return nil
}

// secretFiles are the provider directory's secret files, with the words errors use.
var secretFiles = []struct{ name, what string }{
	{RootKeyFile, "root key"},
	{StoreFile, "store"},
	{AdminKeyFile, "admin key"},
	{AdminCertFile, "admin certificate"},
}

// CheckProviderDir checks the provider directory and every secret file in it that exists
// (root.key, provider.db, admin.key, admin.crt): the directory must be closed to group
// and others, each file a regular file (not a symbolic link) closed to group and others.
// Each refusal names the file, the reason and the command that fixes it.
func CheckProviderDir(dir string) error {
	if err := checkDir(dir); err != nil {
		return err
	}
	for _, f := range secretFiles {
		if err := checkSecretFile(filepath.Join(dir, f.name), f.what); err != nil {
			return err
		}
	}
	return nil
}
