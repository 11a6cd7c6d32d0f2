// Package atomicfile replaces a file so that a crash at any instant leaves either the
// old content or the new one under its name, never a mix or a short file: the data goes
// to a temporary file in the same directory, which is fsynced, renamed over the name
// (or linked to it, for a file that must not exist yet), and the directory is fsynced
// so that the rename itself survives a power cut. It is the one copy of that sequence
// in nkp (swtpm/state writes new state files with it and overwrites its slots in place).
//
// The temporary file is created 0600 and given its final mode before any byte is
// written, so a secret is never readable at a wider mode. A crash can leave a
// temporary file (".NAME.tmp-*") beside the name, never under it; CleanTemps removes
// such leftovers, e.g. when a daemon starts.
//
// A symlink at the name is replaced, not followed. Who may import it: any nkp package
// and test. It imports only the standard library.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// tempPattern is the temporary name of base (os.CreateTemp replaces the *).
func tempPattern(base string) string { return "." + base + ".tmp-*" }

// WriteFile replaces path with data, crash-safely: temp file with mode perm, write,
// fsync, rename, fsync the directory. On error path is unchanged and no temporary file
// is left.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	f, err := Create(path, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Abort()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Commit()
}

// WriteNew is WriteFile for a file that must not exist yet: it links the temporary file
// to path, which fails with an error matching fs.ErrExist if path exists (a file, a
// dangling symlink, anything), so two writers cannot overwrite each other.
func WriteNew(path string, data []byte, perm os.FileMode) error {
	f, err := Create(path, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Abort()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.CommitNew()
}

// File is a replacement of a file being written: an *os.File on the temporary file.
// Finish it with Commit (or CommitNew), or Abort; either may be deferred after the
// other, as only the first has an effect.
type File struct {
	*os.File
	path string
	done bool
}

// Create starts a replacement of path: a temporary file with mode perm in path's
// directory, to be written and then committed.
func Create(path string, perm os.FileMode) (*File, error) {
	f, err := os.CreateTemp(filepath.Dir(path), tempPattern(filepath.Base(path)))
	if err != nil {
		return nil, fmt.Errorf("write %s: creating a temporary file: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("write %s: chmod %#o: %w", path, perm, err)
	}
	return &File{File: f, path: path}, nil
}

// Commit makes the written content the file's: fsync, close, rename over the name,
// fsync the directory. On error the name keeps its old content (or, if only the final
// directory fsync failed, has the new one but may lose it in a power cut).
func (f *File) Commit() error { return f.commit(os.Rename) }

// CommitNew is Commit for a name that must not exist yet (see WriteNew).
func (f *File) CommitNew() error {
	return f.commit(func(tmp, path string) error {
		if err := os.Link(tmp, path); err != nil {
			return err
		}
		return os.Remove(tmp)
	})
}

func (f *File) commit(place func(tmp, path string) error) error {
	if f.done {
		return fmt.Errorf("write %s: already committed or aborted", f.path)
	}
	f.done = true
	tmp := f.Name()
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: fsync: %w", f.path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", f.path, err)
	}
	if err := place(tmp, f.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: putting it in place: %w", f.path, err)
	}
	return SyncDir(filepath.Dir(f.path))
}

// Abort drops the replacement: the temporary file is closed and removed, the name is
// untouched. After Commit it does nothing.
func (f *File) Abort() {
	if f.done {
		return
	}
	f.done = true
	f.Close()
	os.Remove(f.Name())
}

// SyncDir fsyncs a directory, so that entries created, renamed or removed in it
// survive a power cut.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// IsTemp reports whether a directory entry's name is a temporary file of a
// replacement (".NAME.tmp-*"), for code that scans a directory of its own files and
// removes what a crash left.
func IsTemp(name string) bool {
	return strings.HasPrefix(name, ".") && strings.Contains(name, ".tmp-")
}

// CleanTemps removes the temporary files that replacements of each path left when
// their process died (".NAME.tmp-*" beside it), reading each directory once however
// many of its names are given. Call it only while no other process may be writing
// the paths. It reports what it removed; an error names the path whose leftovers
// stay.
func CleanTemps(paths ...string) ([]string, error) {
	var dirs []string
	byDir := map[string][]string{}
	for _, p := range paths {
		dir := filepath.Dir(p)
		if _, ok := byDir[dir]; !ok {
			dirs = append(dirs, dir)
		}
		byDir[dir] = append(byDir[dir], p)
	}
	var removed []string
	var errs []error
	for _, dir := range dirs {
		ps := byDir[dir]
		entries, err := os.ReadDir(dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("temporary files of %s: %w", strings.Join(ps, ", "), err))
			continue
		}
		for _, e := range entries {
			if e.IsDir() {
				continue
			}
			for _, p := range ps {
				if !strings.HasPrefix(e.Name(), strings.TrimSuffix(tempPattern(filepath.Base(p)), "*")) {
					continue
				}
				m := filepath.Join(dir, e.Name())
				if err := os.Remove(m); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, fmt.Errorf("temporary files of %s: %w", p, err))
				} else {
					removed = append(removed, m)
				}
				break
			}
		}
	}
	return removed, errors.Join(errs...)
}
