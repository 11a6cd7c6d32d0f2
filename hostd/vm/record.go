package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// record is what hostd remembers of a protected VM beyond libvirt's definition
// (JournalDir/<uuid>.vm): the name the domain had and the objects its metadata named
// when hostd last saw it. Forget finds a VM that libvirt no longer defines by that name,
// and forget --local-only says from it which catalog objects it leaves. It is written
// (temp, fsync, rename, fsync dir) when an operation settles on the VM, when the VM
// starts on this host (Claim), when status reads its definition and, at hostd's start,
// for a vTPM without one; it goes with unprotect and forget.
type record struct {
	UUID    string          `json:"uuid"`
	Name    string          `json:"name"`
	Objects []domxml.Object `json:"objects,omitempty"`
}

// recordPath is JournalDir/<uuid>.vm.
func (m *Manager) recordPath(vmUUID string) string { return filepath.Join(m.j.dir, vmUUID+".vm") }

// readRecord returns VM vmUUID's record; nil, nil if there is none.
func (m *Manager) readRecord(vmUUID string) (*record, error) {
	b, err := os.ReadFile(m.recordPath(vmUUID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil || r.UUID != vmUUID {
		return nil, fmt.Errorf("%s: not a record of VM %s (%v): remove it, hostd writes it again for a VM it protects", m.recordPath(vmUUID), vmUUID, err)
	}
	return &r, nil
}

// remember records d's name and nkp objects, or removes the record of a domain that has
// no nkp metadata (unprotected). A record that says the same is not written again.
// Failures are logged: the record only helps to find the VM by name later.
func (m *Manager) remember(d *domxml.Domain) {
	if d == nil || kdk.CheckUUID(d.UUID) != nil {
		return
	}
	m.recMu.Lock()
	defer m.recMu.Unlock()
	if d.Metadata == nil {
		if err := m.dropRecordLocked(d.UUID); err != nil {
			m.log.Warn("vm: removing the record of an unprotected VM", "vm", d.Name, "uuid", d.UUID, "err", err)
		}
		return
	}
	r := record{UUID: d.UUID, Name: d.Name, Objects: slices.Clone(d.Metadata.Objects)}
	if old, err := m.readRecord(d.UUID); err == nil && old != nil && old.Name == r.Name && slices.Equal(old.Objects, r.Objects) {
		return
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err == nil {
		err = atomicfile.WriteFile(m.recordPath(d.UUID), append(b, '\n'), 0o600)
	}
	if err != nil {
		m.log.Warn("vm: recording the VM's name (nkpctl vm forget finds it by name once libvirt no longer defines it)", "vm", d.Name, "uuid", d.UUID, "err", err)
	}
}

// dropRecord removes VM vmUUID's record.
func (m *Manager) dropRecord(vmUUID string) error {
	m.recMu.Lock()
	defer m.recMu.Unlock()
	return m.dropRecordLocked(vmUUID)
}

func (m *Manager) dropRecordLocked(vmUUID string) error {
	if err := os.Remove(m.recordPath(vmUUID)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return atomicfile.SyncDir(m.j.dir)
}

// recordUUIDs lists the VMs with a record.
func (m *Manager) recordUUIDs() []string { return m.j.uuidsWith(".vm") }
