package vm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/swtpm/state"
	"golang.org/x/sys/unix"
)

// Recover finishes or rolls back every operation that a crash interrupted, deciding by
// each domain's current definition: if it names the operation's new key, the operation
// committed and its remaining steps (catalog, removal of the old state) are done; if it
// still names the old one, what the operation had written is removed. hostd calls it at
// its start, before it answers hooks; operations call it for their own VM first. A VM
// whose recovery fails keeps its journal (retried next time) and is named in the error.
func (m *Manager) Recover(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	uuids, err := m.j.list()
	if err != nil {
		return fmt.Errorf("vm: journal: %w", err)
	}
	var errs []error
	if ents, err := os.ReadDir(m.j.dir); err == nil {
		for _, de := range ents {
			if atomicfile.IsTemp(de.Name()) { // a journal write that a crash cut short
				errs = append(errs, os.Remove(filepath.Join(m.j.dir, de.Name())))
			}
		}
	}
	for _, u := range uuids {
		if err := m.recoverOneLocked(ctx, u); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) recoverOneLocked(ctx context.Context, uuid string) error {
	e, err := m.j.read(uuid)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vm %s: %w", uuid, err)
	}
	x, err := m.cfg.Libvirt.DomainXML(ctx, uuid)
	if err != nil {
		if errors.Is(err, ErrNoDomain) {
			return fmt.Errorf("vm %q (%s): the domain was undefined while %s was interrupted; its vTPM state is kept in %s: remove %s after saving what you need", e.Domain, uuid, e.Op, filepath.Join(m.cfg.VTPMDir, uuid), m.j.path(uuid))
		}
		return fmt.Errorf("vm %q: finishing an interrupted %s: reading the domain: %w: %w", e.Domain, e.Op, ErrUnavailable, err)
	}
	d, err := domxml.Parse(x)
	if err != nil {
		return fmt.Errorf("vm %q: finishing an interrupted %s: %w", e.Domain, e.Op, err)
	}
	cur, _ := d.Metadata.Object(domxml.ObjectVTPM)
	name := domxml.ObjectVTPM
	switch e.Op {
	case opProtect:
		if cur.KeyID == e.New.KeyID {
			if err := m.register(ctx, uuid, e.New); err != nil {
				return fmt.Errorf("vm %q: key %s: registering in the catalog: %w: %w", e.Domain, e.New.KeyID, ErrUnavailable, err)
			}
			m.step(e.Op, "catalog")
			if e.Adopted != "" {
				if err := removeState(e.Adopted); err != nil {
					return fmt.Errorf("vm %q: removing libvirt's adopted swtpm state: %w", e.Domain, err)
				}
			}
		} else {
			if err := removeDir(e.NewDir); err != nil {
				return fmt.Errorf("vm %q: %w", e.Domain, err)
			}
			if cur.KeyID == "" {
				if err := m.unregister(ctx, uuid, name); err != nil {
					return fmt.Errorf("vm %q: key %s: removing from the catalog: %w: %w", e.Domain, e.New.KeyID, ErrUnavailable, err)
				}
			}
		}
	case opRekey:
		switch cur.KeyID {
		case e.New.KeyID:
			if err := m.register(ctx, uuid, e.New); err != nil {
				return fmt.Errorf("vm %q: key %s: updating the catalog: %w: %w", e.Domain, e.New.KeyID, ErrUnavailable, err)
			}
			m.step(e.Op, "catalog")
			if err := removeDir(e.OldDir); err != nil {
				return fmt.Errorf("vm %q: %w", e.Domain, err)
			}
		case e.Old.KeyID:
			if err := removeDir(e.NewDir); err != nil {
				return fmt.Errorf("vm %q: %w", e.Domain, err)
			}
		default:
			return fmt.Errorf("vm %q: an interrupted rekey from key %s to %s, but the domain names key %q: check it by hand, then remove %s", e.Domain, e.Old.KeyID, e.New.KeyID, cur.KeyID, m.j.path(uuid))
		}
	case opUnprotect:
		switch cur.KeyID {
		case "":
			if err := m.unregister(ctx, uuid, name); err != nil {
				return fmt.Errorf("vm %q: key %s: removing from the catalog: %w: %w", e.Domain, e.Old.KeyID, ErrUnavailable, err)
			}
			m.step(e.Op, "catalog")
			if err := removeDir(e.OldDir); err != nil {
				return fmt.Errorf("vm %q: %w", e.Domain, err)
			}
		case e.Old.KeyID:
			if e.Emulator != "" {
				if err := os.RemoveAll(e.Staging); err != nil {
					return fmt.Errorf("vm %q: %w", e.Domain, err)
				}
				if _, err := os.Lstat(e.Aside); e.Aside != "" && err == nil {
					if err := os.RemoveAll(e.Emulator); err != nil {
						return fmt.Errorf("vm %q: %w", e.Domain, err)
					}
					if err := os.Rename(e.Aside, e.Emulator); err != nil {
						return fmt.Errorf("vm %q: moving %s back: %w", e.Domain, e.Aside, err)
					}
				} else if !e.EmulatorExisted {
					if err := os.RemoveAll(e.Emulator); err != nil {
						return fmt.Errorf("vm %q: %w", e.Domain, err)
					}
				}
				if err := atomicfile.SyncDir(filepath.Dir(e.Emulator)); err != nil && !errors.Is(err, unix.ENOENT) {
					return fmt.Errorf("vm %q: %w", e.Domain, err)
				}
			}
		default:
			return fmt.Errorf("vm %q: an interrupted unprotect of key %s, but the domain names key %s: check it by hand, then remove %s", e.Domain, e.Old.KeyID, cur.KeyID, m.j.path(uuid))
		}
	default:
		return fmt.Errorf("vm %q: journal %s: unknown operation %q", e.Domain, m.j.path(uuid), e.Op)
	}
	m.step(e.Op, "cleaned")
	if err := m.j.remove(uuid); err != nil {
		return fmt.Errorf("vm %q: journal: %w", e.Domain, err)
	}
	m.log.Info("vm: interrupted operation settled", "vm", e.Domain, "op", e.Op, "committed", cur.KeyID == e.New.KeyID && e.Op != opUnprotect || e.Op == opUnprotect && cur.KeyID == "")
	return nil
}

// removeDir removes an nkp state directory and its <vm-uuid> parent when that is empty.
func removeDir(dir string) error {
	if dir == "" {
		return nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	parent := filepath.Dir(dir)
	if err := os.Remove(parent); err != nil && !errors.Is(err, unix.ENOTEMPTY) && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(parent))
}

// removeState removes swtpm's state files (and lock) from a libvirt state directory,
// then the directory and its parent when they are empty. Other files stay.
func removeState(dir string) error {
	for _, n := range state.Names {
		if err := os.Remove(filepath.Join(dir, state.FileName(n))); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	os.Remove(filepath.Join(dir, ".lock"))
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Remove(d); err != nil {
			break // not empty, or gone: leave it
		}
	}
	return nil
}

// dupFD returns a close-on-exec duplicate of f's descriptor.
func dupFD(f *os.File) (int, error) {
	return unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
}
