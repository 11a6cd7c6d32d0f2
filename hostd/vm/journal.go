package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// Operations in the journal.
const (
	opProtect   = "protect"
	opRekey     = "rekey"
	opUnprotect = "unprotect"
	opForget    = "forget"
)

// entry is one VM's journal: what an operation is about to do, written before it
// touches anything, so that recovery can finish or undo it.
type entry struct {
	Op     string `json:"op"`
	Domain string `json:"domain"`
	UUID   string `json:"uuid"`
	// Old and New are the vTPM objects before and after ("" KeyID: none).
	Old domxml.Object `json:"old"`
	New domxml.Object `json:"new"`
	// OldDir and NewDir are nkp state directories (StateDir) of Old and New.
	OldDir string `json:"old_dir,omitempty"`
	NewDir string `json:"new_dir,omitempty"`
	// Adopted is libvirt's swtpm state directory that protect read (removed once the
	// new XML is defined).
	Adopted string `json:"adopted,omitempty"`
	// Unprotect with the TPM kept: libvirt's state directory, where its new content is
	// staged, where an existing one was moved aside, and whether it existed.
	Emulator        string `json:"emulator,omitempty"`
	Staging         string `json:"staging,omitempty"`
	Aside           string `json:"aside,omitempty"`
	EmulatorExisted bool   `json:"emulator_existed,omitempty"`
	// Disks are the disks the operation converts or rekeys.
	Disks []diskEntry `json:"disks,omitempty"`
	// RemoveOriginal: protect removes each original disk file after the switch instead
	// of keeping it for finalize.
	RemoveOriginal bool `json:"remove_original,omitempty"`
	// Forget: the operation interrupted on the undefined VM that forget replaced (its
	// Disks, Staging and Aside are kept above, for the report), and the catalog objects
	// forget removed.
	Interrupted  string          `json:"interrupted,omitempty"`
	Unregistered []domxml.Object `json:"unregistered,omitempty"`
	// LocalOnly: forget does not ask the provider (vmapi.ForgetRequest.LocalOnly); Left
	// are the VM's objects the catalog keeps then, as this host knew them.
	LocalOnly bool            `json:"local_only,omitempty"`
	Left      []domxml.Object `json:"left,omitempty"`
}

type journal struct{ dir string }

func (j journal) path(uuid string) string { return filepath.Join(j.dir, uuid+".json") }

// exists says whether uuid has an entry (an operation not finished yet).
func (j journal) exists(uuid string) bool {
	_, err := os.Lstat(j.path(uuid))
	return err == nil
}

func (j journal) write(e *entry) error {
	b, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(j.path(e.UUID), append(b, '\n'), 0o600); err != nil {
		// Written before anything else changes: nothing was.
		return fmt.Errorf("vm %q: writing its journal entry before the %s starts: %w: nkp-hostd's state directory %s must be writable and have free space (df %s); nothing was changed, run the command again once it is", e.Domain, e.Op, err, j.dir, j.dir)
	}
	return nil
}

func (j journal) read(uuid string) (*entry, error) {
	b, err := os.ReadFile(j.path(uuid))
	if err != nil {
		return nil, err
	}
	var e entry
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, fmt.Errorf("journal %s: %w (move it away after checking the VM by hand)", j.path(uuid), err)
	}
	if e.UUID != uuid {
		return nil, fmt.Errorf("journal %s: names VM %q", j.path(uuid), e.UUID)
	}
	return &e, nil
}

func (j journal) remove(uuid string) error {
	if err := os.Remove(j.path(uuid)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return atomicfile.SyncDir(j.dir)
}

// list returns the UUIDs with a journal.
func (j journal) list() ([]string, error) {
	ents, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, de := range ents {
		if atomicfile.IsTemp(de.Name()) {
			continue
		}
		if u, ok := strings.CutSuffix(de.Name(), ".json"); ok && !strings.HasPrefix(u, ".") {
			out = append(out, u)
		}
	}
	return out, nil
}

// uuidsWith lists the VMs that have a file <uuid>+suffix in the journal directory (a
// kept-files list, a record), skipping names that are not a UUID; an unreadable
// directory lists none.
func (j journal) uuidsWith(suffix string) []string {
	ents, _ := os.ReadDir(j.dir)
	var out []string
	for _, e := range ents {
		if u, ok := strings.CutSuffix(e.Name(), suffix); ok && kdk.CheckUUID(u) == nil {
			out = append(out, u)
		}
	}
	return out
}
