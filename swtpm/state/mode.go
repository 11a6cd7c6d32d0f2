package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// applyModeLocked gives the state files already in the directory (their .bak copies and
// the state ID file too) the mode Options.Mode asks for, when it was given; called each time the Dir takes the
// lock, so a second process never touches the files of a running one.
//
// swtpm writes a state file anew on every store (temp file, rename), so after its first
// write the file has the mode whatever it had before; a Dir overwrites the older slot of
// an encrypted file in place, which keeps the file's old mode. Under libvirt that
// matters: swtpm_setup's run of the TPM creates the files without mode= (0640), then
// libvirt starts the TPM with mode=0600, and the encrypted state must not stay readable
// by the group. A file that cannot be changed (not owned by this user) is logged and
// left as it is, as swtpm would only replace it at its next write; links and other
// non-regular files are left to Load, which refuses them.
func (d *Dir) applyModeLocked() {
	if !d.explicitMode {
		return
	}
	files := []string{stateIDFile}
	for _, name := range Names {
		files = append(files, FileName(name), FileName(name)+".bak")
	}
	for _, file := range files {
		p := filepath.Join(d.dir, file)
		// Open without following a link and change the mode through the descriptor: a
		// path-based chmod after a stat would follow a symlink swapped in between by
		// whoever else can write the directory, onto any file this process may chmod.
		fd, err := openNoIntr(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ELOOP) {
				d.log.Warn("--tpmstate mode=: cannot open a state file; its mode is left as it is", "path", p, "err", err)
			}
			continue
		}
		f := os.NewFile(uintptr(fd), p)
		fi, err := f.Stat()
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() == d.mode {
			f.Close()
			continue
		}
		err = f.Chmod(d.mode)
		f.Close()
		if err != nil {
			d.log.Warn("--tpmstate mode=: cannot change the mode of a state file; run nkp-swtpm as the files' owner",
				"path", p, "mode", fmt.Sprintf("%#o", d.mode), "have", fmt.Sprintf("%#o", fi.Mode().Perm()), "err", err)
			continue
		}
		d.log.Debug("state file mode changed as --tpmstate mode= asks",
			"path", p, "mode", fmt.Sprintf("%#o", d.mode), "was", fmt.Sprintf("%#o", fi.Mode().Perm()))
	}
}
