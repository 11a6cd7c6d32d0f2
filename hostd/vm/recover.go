package vm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
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
	m.lock("recovery of interrupted operations", nil)
	defer m.unlock()
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
	// A new vTPM's staging directory (manufacture.go) that a killed hostd left: its
	// one-time key died with that hostd, so nothing in it can be read. It goes, and so
	// does its VM's vTPM directory when that held nothing else (a VM never protected).
	if stale, err := filepath.Glob(filepath.Join(m.cfg.VTPMDir, "*", ".setup-*")); err == nil {
		for _, s := range stale {
			if err := os.RemoveAll(s); err != nil {
				errs = append(errs, fmt.Errorf("vm: removing the interrupted vTPM setup %s: %w", s, err))
				continue
			}
			_ = os.Remove(filepath.Dir(s)) // fails, as it should, unless it is empty
		}
	}
	for _, u := range uuids {
		if err := m.recoverOneLocked(ctx, u); err != nil {
			errs = append(errs, err)
		}
	}
	m.rememberVTPMs(ctx)
	return errors.Join(errs...)
}

// rememberVTPMs records the name of each VM with vTPM state but no record that libvirt
// defines with nkp's metadata (a VM protected by an older hostd), so that forget finds
// it by name once it is undefined. One definition read per such VM, at hostd's start.
func (m *Manager) rememberVTPMs(ctx context.Context) {
	ents, err := os.ReadDir(m.cfg.VTPMDir)
	if err != nil {
		return
	}
	for _, de := range ents {
		u := de.Name()
		if !de.IsDir() || kdk.CheckUUID(u) != nil || len(m.stateKeys(u)) == 0 {
			continue
		}
		if r, err := m.readRecord(u); r != nil || err != nil {
			continue
		}
		x, err := m.cfg.Libvirt.DomainXML(ctx, u)
		if err != nil {
			continue // undefined (its name is unknown) or libvirt did not answer
		}
		if d, err := domxml.Parse(x); err == nil && d.Metadata != nil {
			m.remember(d)
		}
	}
}

func (m *Manager) recoverOneLocked(ctx context.Context, uuid string) error {
	e, err := m.j.read(uuid)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vm %s: %w", uuid, err)
	}
	if e.Op == opForget {
		// Confirmed by the operator: finished here, or undone if libvirt defines the VM
		// again (ErrDefined then says so, and the journal is gone).
		if _, err := m.forgetLocked(ctx, e); err != nil && !errors.Is(err, ErrDefined) {
			return err
		}
		return nil
	}
	x, err := m.cfg.Libvirt.DomainXML(ctx, uuid)
	if err != nil {
		if errors.Is(err, ErrNoDomain) {
			return fmt.Errorf("vm %q (%s): the domain was undefined while %s was interrupted; its vTPM state is kept in %s: if the VM is gone for good, nkpctl vm forget %s --yes removes it with its catalog objects; else define it again (virsh define) and hostd finishes the %s", e.Domain, uuid, e.Op, filepath.Join(m.cfg.VTPMDir, uuid), uuid, e.Op)
		}
		return fmt.Errorf("vm %q: finishing an interrupted %s: reading the domain: %w: %w", e.Domain, e.Op, ErrUnavailable, err)
	}
	d, err := domxml.Parse(x)
	if err != nil {
		return fmt.Errorf("vm %q: finishing an interrupted %s: %w", e.Domain, e.Op, err)
	}
	cur, _ := d.Metadata.Object(domxml.ObjectVTPM)
	name := domxml.ObjectVTPM
	vtpm := e.New.KeyID != "" || e.Old.KeyID != "" // the operation changes the vTPM
	switch {
	case !vtpm:
		if e.Op != opProtect && e.Op != opRekey && e.Op != opUnprotect {
			return fmt.Errorf("vm %q: journal %s: unknown operation %q", e.Domain, m.j.path(uuid), e.Op)
		}
	case e.Op == opProtect:
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
	case e.Op == opRekey:
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
	case e.Op == opUnprotect:
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
	if err := m.recoverDisks(ctx, e, d); err != nil {
		return err
	}
	m.step(e.Op, "cleaned")
	m.remember(d) // its name and objects now, or no record once unprotected
	if err := m.j.remove(uuid); err != nil {
		return fmt.Errorf("vm %q: journal: %w", e.Domain, err)
	}
	m.log.Info("vm: operation settled", "vm", e.Domain, "op", e.Op)
	return nil
}

// diskCommitted says whether the domain d took the disk change de: its disk names the
// new file (convert), or its metadata names the new key (shallow).
func diskCommitted(d *domxml.Domain, de *diskEntry) bool {
	if de.Mode == modeShallow {
		o, _ := d.Metadata.Object(domxml.DiskObject(de.Target))
		return o.KeyID == de.Obj.KeyID
	}
	dk, ok := d.Disk(de.Target)
	return ok && dk.Source == de.New
}

// recoverDisks finishes (catalog, secrets, the old keyslot, the original file) or rolls
// back (the new file, the new keyslot, the new secret, the catalog entry) each disk of
// an operation, deciding by the domain's definition d.
func (m *Manager) recoverDisks(ctx context.Context, e *entry, d *domxml.Domain) error {
	if len(e.Disks) == 0 {
		return nil
	}
	var keys keyring = keyring{}
	defer keys.wipe()
	key := func(o domxml.Object) ([]byte, error) {
		if o.KeyID == "" {
			return nil, nil
		}
		if k, ok := keys[o.KeyID]; ok {
			return k, nil
		}
		k, err := m.diskKey(ctx, e.Domain, e.UUID, o)
		if err != nil {
			return nil, err
		}
		keys[o.KeyID] = k
		return k, nil
	}
	var dropSecrets []domxml.Object
	var errs []error
	// Other domains' definitions, read once (at the first original to remove).
	var others []*domxml.Domain
	var othersErr error
	othersRead := false
	for i := range e.Disks {
		de := &e.Disks[i]
		done := diskCommitted(d, de)
		switch {
		case done && de.Mode == modeShallow:
			// The old keyslot goes, opened with the new key.
			if err := m.dropSlot(ctx, de, key, de.Obj, de.Old); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: disk %s: removing the keyslot of key %s: %w", e.Domain, de.Target, de.Old.KeyID, err))
				continue
			}
			m.step(e.Op, "disk-slot-removed")
		case !done && de.Mode == modeShallow:
			if err := m.dropSlot(ctx, de, key, de.Old, de.Obj); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: disk %s: removing the new keyslot of key %s: %w", e.Domain, de.Target, de.Obj.KeyID, err))
				continue
			}
		case !done:
			if err := removeIfThere(de.New); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: disk %s: removing the unused %s: %w", e.Domain, de.Target, de.New, err))
				continue
			}
			atomicfile.SyncDir(filepath.Dir(de.New))
		}
		switch {
		case done && de.Obj.KeyID != "":
			if err := m.register(ctx, e.UUID, de.Obj); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: disk %s key %s: registering in the catalog: %w: %w", e.Domain, de.Target, de.Obj.KeyID, ErrUnavailable, err))
				continue
			}
			if de.Old.KeyID != "" {
				dropSecrets = append(dropSecrets, de.Old)
			}
		case done: // unprotected
			if err := m.unregister(ctx, e.UUID, de.Old.Name); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: disk %s key %s: removing from the catalog: %w: %w", e.Domain, de.Target, de.Old.KeyID, ErrUnavailable, err))
				continue
			}
			dropSecrets = append(dropSecrets, de.Old)
		case de.Obj.KeyID != "":
			if _, named := d.Metadata.Object(de.Obj.Name); !named && e.Op == opProtect {
				if err := m.unregister(ctx, e.UUID, de.Obj.Name); err != nil {
					errs = append(errs, fmt.Errorf("vm %q: disk %s key %s: removing from the catalog: %w: %w", e.Domain, de.Target, de.Obj.KeyID, ErrUnavailable, err))
					continue
				}
			}
			dropSecrets = append(dropSecrets, de.Obj)
		}
		if done && de.Mode == modeConvert && de.Orig != de.New && !referenced(d, de.Orig) {
			other, oerr := "", error(nil)
			if e.RemoveOriginal {
				if !othersRead {
					others, othersErr = m.otherDomains(ctx, e.UUID)
					othersRead = true
				}
				if oerr = othersErr; oerr == nil {
					other = usedBy(others, de.Orig)
				}
				if t, ok := linkTarget(de.Orig); ok && oerr == nil && other == "" {
					oerr = fmt.Errorf("%s is a symbolic link to %s", de.Orig, t) // kept: finalize explains
				}
				if oerr != nil || other != "" {
					m.log.Warn("vm: original disk file kept instead of removed: another domain may use it (nkpctl vm protect --finalize removes it once none does)", "vm", e.Domain, "disk", de.Target, "file", de.Orig, "domain", other, "err", oerr)
				}
			}
			if e.RemoveOriginal && oerr == nil && other == "" {
				if err := os.Remove(de.Orig); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, fmt.Errorf("vm %q: disk %s: removing the original %s: %w", e.Domain, de.Target, de.Orig, err))
					continue
				}
				atomicfile.SyncDir(filepath.Dir(de.Orig))
			} else if err := m.keep(e.UUID, kept{Target: de.Target, Path: de.Orig, ReplacedBy: de.New, Op: e.Op, Time: time.Now().UTC(), VM: e.Domain}); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: disk %s: recording the kept original %s: %w", e.Domain, de.Target, de.Orig, err))
				continue
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	m.step(e.Op, "disk-catalog")
	if len(dropSecrets) > 0 && m.cfg.Secrets != nil {
		if err := m.cfg.Secrets.Remove(ctx, e.UUID, dropSecrets); err != nil {
			return fmt.Errorf("vm %q: undefining the unused disk secrets: %w: %w", e.Domain, ErrUnavailable, err)
		}
	}
	return nil
}

// dropSlot removes the keyslot that key gone opens from a disk's image, opening it with
// key stay; a gone key that opens nothing (never added, or removed already) is fine.
func (m *Manager) dropSlot(ctx context.Context, de *diskEntry, key func(domxml.Object) ([]byte, error), stay, gone domxml.Object) error {
	ks, err := key(stay)
	if err != nil {
		return err
	}
	kg, err := key(gone)
	if err != nil {
		return err
	}
	img := qemuimg.Image{Path: de.New, Format: de.DstFormat}
	probe := img
	probe.Key = kg
	if err := m.qi().Unlock(ctx, probe); errors.Is(err, qemuimg.ErrWrongKey) {
		return nil
	} else if err != nil {
		return err
	}
	img.Key = ks
	return m.qi().RemoveKey(ctx, img, kg)
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

// removeIfThere removes path; a path that is not there is no error. It looks first:
// unlink on a read-only file system fails with EROFS even for a name that does not
// exist, which would leave a rollback that created nothing unfinished.
func removeIfThere(path string) error {
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
