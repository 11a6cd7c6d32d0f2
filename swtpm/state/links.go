package state

import (
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// checkLinks refuses a state file with more hard links than the names this package
// gives one inode itself: the file, its .bak (keepBackupLocked links the current file
// there before a write replaces it), the backup's temporary name after a crash, and
// .damaged.* evidence (keepEvidence). Another name — in another directory, made by
// whoever can write the state directory — would let that name's owner, or a process
// reading it as root, see or change the TPM's state behind nkp-swtpm's back, as a
// symbolic link would (those are refused by O_NOFOLLOW).
func checkLinks(p string, st *unix.Stat_t) error {
	if st.Nlink <= 1 {
		return nil
	}
	file := strings.TrimSuffix(p, ".bak")
	dir, base := filepath.Split(file)
	names := []string{file, file + ".bak", filepath.Join(dir, "TMP2-00."+strings.TrimPrefix(base, "tpm2-00.")+".bak")}
	evidence, _ := filepath.Glob(file + ".damaged.*")
	own := uint64(0)
	for _, n := range append(names, evidence...) {
		var o unix.Stat_t
		if unix.Lstat(n, &o) == nil && o.Dev == st.Dev && o.Ino == st.Ino {
			own++
		}
	}
	if uint64(st.Nlink) > own {
		return fmt.Errorf("state file %s has %d hard links, %d of them names nkp-swtpm does not give it (another name, maybe outside the state directory, reaches the same data): refused like a symbolic link, the file was left untouched; copy it to a file of its own (cp --remove-destination) if the link is intended", p, st.Nlink, uint64(st.Nlink)-own)
	}
	return nil
}
