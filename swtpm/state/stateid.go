package state

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

// stateIDFile holds the directory's state ID: 32 hex digits and a newline. It is made
// (random) by the first keyed Store and written into the authenticated header of every
// record after that, so that a state file copied in from another VM's directory is
// refused (ErrForeign) even when both use the same key. It is not secret. Files
// without a state ID (nkp's format versions 1 and 2, swtpm's) still load and are bound
// at their next write. Copying a whole directory, dot files included, copies its
// identity: the binding stops single files being swapped, not whole states.
const stateIDFile = ".nkp-state-id"

// readStateID returns dir's state ID, or nil when it has none.
func readStateID(dir string) ([]byte, error) {
	p := filepath.Join(dir, stateIDFile)
	fd, err := openNoIntr(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, &fs.PathError{Op: "open", Path: p, Err: err})
	}
	defer unix.Close(fd)
	buf := make([]byte, 2*stateIDSize+2)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, &fs.PathError{Op: "read", Path: p, Err: err})
	}
	id, err := readStateIDBytes(buf[:n])
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %s does not hold a state ID (%d hex digits and a newline); restore it from a backup, or remove it only if none of the state files was written with it (they would then be refused)", dir, p, 2*stateIDSize)
	}
	return id, nil
}

// makeStateID gives dir a new random state ID (internal/atomicfile.WriteNew: temp
// file, fsync, link into place, fsync of the directory) unless another process made one
// meanwhile, and returns the ID the directory has.
func makeStateID(dir string, mode os.FileMode) ([]byte, error) {
	id := make([]byte, stateIDSize)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("state directory %s: random state ID: %w", dir, err)
	}
	err := atomicfile.WriteNew(filepath.Join(dir, stateIDFile), []byte(hex.EncodeToString(id)+"\n"), mode)
	if errors.Is(err, fs.ErrExist) {
		return readStateID(dir) // a link never replaces: if another process made the ID first, keep theirs
	}
	if err != nil {
		return nil, fmt.Errorf("state directory %s: state ID: %w", dir, err)
	}
	return id, nil
}

// readStateIDBytes parses the content of a state ID file.
func readStateIDBytes(b []byte) ([]byte, error) {
	id, err := hex.DecodeString(strings.TrimSuffix(string(b), "\n"))
	if err != nil || len(id) != stateIDSize {
		return nil, fmt.Errorf("not a state ID: want %d hex digits and a newline", 2*stateIDSize)
	}
	return id, nil
}
