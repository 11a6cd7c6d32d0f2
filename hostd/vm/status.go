package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
)

// Status reports a domain: its nkp objects (key IDs, KDK versions, whether each is on
// the primary version), whether it runs and, if so, whether its TPM is present (QEMU's
// query-tpm through libvirt) and answering (Config.ProbeVTPM: hostd asks the vTPM for
// GET_TPMESTABLISHED on its status channel), and anything that needs an operator. For
// the UUID (or the name it had) of a domain libvirt does not define but whose state nkp
// keeps, it reports that state as a problem. A protected domain's record (record.go) is
// brought up to date on the way.
func (m *Manager) Status(ctx context.Context, domain string) (vmapi.VM, error) {
	_, d, err := m.lookup(ctx, domain)
	if errors.Is(err, ErrNoDomain) && kdk.CheckUUID(domain) == nil {
		if v, ok := m.orphanVM(domain); ok {
			return v, nil
		}
	} else if errors.Is(err, ErrNoDomain) {
		// The name of a domain undefined since, which nkp recorded or whose original
		// disk files it keeps.
		if us := m.undefinedNamed(ctx, domain); len(us) == 1 {
			if v, ok := m.orphanVM(us[0]); ok {
				return v, nil
			}
		}
	}
	if err != nil {
		return vmapi.VM{}, err
	}
	if d.Metadata != nil {
		m.remember(d) // a domain renamed (virsh domrename) since its last operation
	}
	v := vmapi.VM{Domain: d.Name, UUID: d.UUID, Protected: d.Metadata != nil}
	if _, err := os.Stat(m.j.path(d.UUID)); err == nil {
		e, _ := m.j.read(d.UUID)
		op := "operation"
		if e != nil {
			op = e.Op
		}
		if m.mu.TryLock() {
			m.mu.Unlock()
			v.Problems = append(v.Problems, fmt.Sprintf("an interrupted %s is not finished: it is finished at hostd's next start or by the next nkpctl vm command on %s", op, d.Name))
		} else {
			v.Note = fmt.Sprintf("a %s may be in progress", op)
		}
	}
	lc, err := m.cfg.Libvirt.Lifecycle(ctx, d.UUID)
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: asking libvirt whether it runs: %w: %w", d.Name, ErrUnavailable, err)
	}
	v.Running = lc.Active
	if _, hasVTPM := d.Metadata.Object(domxml.ObjectVTPM); !hasVTPM {
		if keys := m.stateKeys(d.UUID); len(keys) > 0 && !m.j.exists(d.UUID) {
			dir := filepath.Join(m.cfg.VTPMDir, d.UUID)
			v.Problems = append(v.Problems, fmt.Sprintf("nkp keeps vTPM state for this VM (key %s, in %s), but its definition names no nkp vTPM: was nkp's metadata removed (virsh edit, or virsh define of an older XML)? To get that vTPM back, put the <nkp:vm> element back with virsh edit %s (its key ID and KDK version: nkpctl provider objects); if the vTPM is not wanted, remove %s", strings.Join(keys, ", "), dir, d.Name, dir))
		}
	}
	if d.Metadata == nil {
		m.diskStatus(ctx, d, lc.Active, &v)
		return v, nil
	}
	v.ProviderID = d.Metadata.ProviderID
	if p := m.cfg.Keys.ProviderID(); p != d.Metadata.ProviderID {
		v.Problems = append(v.Problems, fmt.Sprintf("its keys come from provider %s, but this host is joined to provider %s: it will not start here", d.Metadata.ProviderID, p))
	}
	primary, perr := m.cfg.Keys.Primary(ctx)
	if perr != nil {
		v.Problems = append(v.Problems, fmt.Sprintf("this host has no primary KDK version (%v): check nkp-hostd's connection to the provider", perr))
	}
	for _, o := range d.Metadata.Objects {
		v.Objects = append(v.Objects, vmapi.Object{Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion, Primary: perr == nil && o.KDKID == primary.ID})
	}
	m.diskStatus(ctx, d, lc.Active, &v)
	obj, hasVTPM := d.Metadata.Object(domxml.ObjectVTPM)
	if !hasVTPM {
		return v, nil
	}
	tp, err := d.TPM()
	want := domxml.SocketPath(m.cfg.SocketDir, d.UUID)
	switch {
	case err != nil:
		v.Problems = append(v.Problems, err.Error())
	case tp == nil || tp.Backend != domxml.BackendExternal || tp.SocketPath != want:
		v.Problems = append(v.Problems, fmt.Sprintf("its metadata names vTPM key %s but its <tpm> is not nkp's (external backend at %s): run nkpctl vm unprotect and protect again, or restore the <tpm> with virsh edit", obj.KeyID, want))
	}
	if fi, err := os.Stat(StateDir(m.cfg.VTPMDir, d.UUID, obj.KeyID)); err != nil || !fi.IsDir() {
		p := fmt.Sprintf("the state directory of vTPM key %s is missing on this host (%s): the VM's TPM starts empty here unless it migrates in", obj.KeyID, StateDir(m.cfg.VTPMDir, d.UUID, obj.KeyID))
		if others := m.stateKeys(d.UUID); len(others) > 0 && !m.j.exists(d.UUID) {
			// Not a VM new to this host: its state is here under another key.
			p += fmt.Sprintf("; but nkp keeps this VM's vTPM state under key %s: was the metadata's key-id edited, or does the definition come from an older XML? Put key-id=\"%s\" back with virsh edit %s before it starts (nkpctl provider objects lists its KDK version), or it starts with an empty TPM", strings.Join(others, ", "), others[0], d.Name)
		}
		v.Problems = append(v.Problems, p)
	}
	if !lc.Active {
		v.TPM = "stopped"
		return v, nil
	}
	err = m.cfg.Libvirt.TPMCheck(ctx, d.UUID)
	if err == nil && m.cfg.ProbeVTPM != nil {
		err = m.cfg.ProbeVTPM(ctx, d.UUID)
	}
	if err != nil {
		v.TPM = fmt.Sprintf("not answering: %v", err)
		v.Problems = append(v.Problems, fmt.Sprintf("the running VM's TPM (key %s) does not answer: %v", obj.KeyID, err))
	} else {
		v.TPM = "ok"
	}
	return v, nil
}

// List reports every protected domain, every domain with a problem (an unfinished
// operation, vTPM state kept although its definition lost nkp's metadata), and what nkp
// keeps for domains libvirt does not define (undefined, or moved away): vTPM state,
// original disk files, or only a record whose objects the catalog still holds.
func (m *Manager) List(ctx context.Context) ([]vmapi.VM, error) {
	uuids, err := m.cfg.Libvirt.Domains(ctx)
	if err != nil {
		return nil, fmt.Errorf("vm: listing domains: %w: %w", ErrUnavailable, err)
	}
	out := []vmapi.VM{}
	// Domains that libvirt does not define persistently but nkp keeps vTPM state or
	// kept disk files for: a transient protected domain (migrated in without
	// --persistent), or one that was undefined or moved to another host, whose state
	// and original disk files are left behind.
	var candidates []string
	ents, _ := os.ReadDir(m.cfg.VTPMDir)
	for _, de := range ents {
		if u := de.Name(); de.IsDir() && kdk.CheckUUID(u) == nil && len(m.stateKeys(u)) > 0 {
			candidates = append(candidates, u)
		}
	}
	candidates = append(candidates, m.keptUUIDs()...)
	candidates = append(candidates, m.recordUUIDs()...) // a finalized VM undefined since: its objects stay in the catalog
	if js, err := m.j.list(); err == nil {
		candidates = append(candidates, js...) // an operation interrupted on a VM undefined since
	}
	slices.Sort(candidates)
	for _, u := range slices.Compact(candidates) {
		if slices.Contains(uuids, u) {
			continue
		}
		if _, _, err := m.lookup(ctx, u); err == nil {
			uuids = append(uuids, u) // transient: reported below like the others
			continue
		} else if !errors.Is(err, ErrNoDomain) {
			continue
		}
		if v, ok := m.orphanVM(u); ok {
			out = append(out, v)
		}
	}
	for _, u := range uuids {
		v, err := m.Status(ctx, u)
		if errors.Is(err, ErrNoDomain) {
			continue // undefined meanwhile
		}
		if err != nil {
			out = append(out, vmapi.VM{Domain: u, UUID: u, Problems: []string{err.Error()}})
			continue
		}
		if v.Protected || len(v.Problems) > 0 {
			out = append(out, v)
		}
	}
	return out, nil
}

// orphanVM reports what nkp keeps for VM vmUUID, which libvirt does not define: vTPM
// state and original disk files kept for finalize; ok is false if it keeps neither.
func (m *Manager) orphanVM(vmUUID string) (vmapi.VM, bool) {
	keys := m.stateKeys(vmUUID)
	ks, kerr := m.readKept(vmUUID)
	e, jerr := m.j.read(vmUUID)
	rec, rerr := m.readRecord(vmUUID)
	recorded := rec != nil && len(rec.Objects) > 0
	if len(keys) == 0 && len(ks) == 0 && kerr == nil && errors.Is(jerr, fs.ErrNotExist) && !recorded && rerr == nil {
		return vmapi.VM{}, false
	}
	v := vmapi.VM{Domain: vmUUID, UUID: vmUUID}
	if len(keys) > 0 {
		v = m.orphan(vmUUID, keys)
	}
	if recorded && len(keys) == 0 && len(ks) == 0 {
		// A VM whose disks were finalized, or one that never had a vTPM here: only its
		// record says that the catalog still holds its objects.
		v.Problems = append(v.Problems, recordedProblem(rec))
	}
	if rerr != nil {
		v.Problems = append(v.Problems, fmt.Sprintf("VM %s is no longer defined in libvirt, and its record cannot be read: %v", vmUUID, rerr))
	}
	switch {
	case jerr == nil && e.Op == opForget:
		v.Problems = append(v.Problems, fmt.Sprintf("a forget of VM %s is not finished (the provider could not be reached, or hostd stopped): run nkpctl vm forget %s --yes again (hostd retries at its start too)", vmUUID, vmUUID))
	case jerr == nil:
		v.Problems = append(v.Problems, fmt.Sprintf("an interrupted %s of VM %s is not finished, and libvirt no longer defines the VM: define it again (virsh define) and hostd finishes it, or, if it is gone for good, nkpctl vm forget %s", e.Op, vmUUID, vmUUID))
	case !errors.Is(jerr, fs.ErrNotExist):
		v.Problems = append(v.Problems, fmt.Sprintf("VM %s: its journal entry cannot be read: %v", vmUUID, jerr))
	}
	if kerr != nil {
		v.Problems = append(v.Problems, fmt.Sprintf("VM %s is no longer defined in libvirt, and the list of its kept original disk files cannot be read: %v", vmUUID, kerr))
	}
	if len(ks) > 0 {
		v.Problems = append(v.Problems, keptProblem(vmUUID, ks))
	}
	return v, true
}

// recordedProblem says what the record of a VM that libvirt does not define, and of
// which nkp keeps nothing else on this host, still stands for: its objects in the
// provider's catalog.
func recordedProblem(r *record) string {
	var objs []string
	for _, o := range r.Objects {
		objs = append(objs, fmt.Sprintf("%s (key %s)", o.Name, o.KeyID))
	}
	return fmt.Sprintf("libvirt defines no domain %s (named %s when hostd last saw it) on this host, and nkp keeps neither vTPM state nor disk files for it, but its objects %s are still in the provider's catalog, where they keep their KDK versions from being retired. If the VM is gone for good, nkpctl vm forget %s removes them; if it runs on another host now, that host owns them (nkpctl provider objects --vm %s shows the owner) and forget removes only this host's record of it", r.UUID, r.Name, strings.Join(objs, ", "), r.Name, r.UUID)
}

// orphan reports the vTPM state nkp keeps for a VM that libvirt does not define.
func (m *Manager) orphan(vmUUID string, keys []string) vmapi.VM {
	dir := filepath.Join(m.cfg.VTPMDir, vmUUID)
	return vmapi.VM{Domain: vmUUID, UUID: vmUUID, Problems: []string{fmt.Sprintf("libvirt defines no domain %s on this host, but nkp keeps its vTPM state (key %s) in %s: the domain was undefined (virsh undefine) or moved to another host. If it is gone for good, nkpctl vm forget %s removes that state (its TPM's data goes with it), the original disk files kept for it and its objects in the provider's catalog, which otherwise keep their KDK version from being retired; if it runs on another host now, forget removes only this stale copy: that host owns its catalog objects once the VM started there (nkpctl provider objects --vm %s shows the owner)", vmUUID, strings.Join(keys, ", "), dir, vmUUID, vmUUID)}}
}

// stateKeys lists the key IDs of the vTPM state directories nkp keeps for a VM.
func (m *Manager) stateKeys(vmUUID string) []string {
	ents, err := os.ReadDir(filepath.Join(m.cfg.VTPMDir, vmUUID))
	if err != nil {
		return nil
	}
	var keys []string
	for _, e := range ents {
		if e.IsDir() && kdk.CheckUUID(e.Name()) == nil {
			keys = append(keys, e.Name())
		}
	}
	return keys
}

// diskStatus adds each disk of d to v: its object, its LUKS header (read with its key
// when the VM is shut off, which also proves the key opens it), the originals kept for
// finalize, and for a running VM whether QEMU opened it encrypted.
func (m *Manager) diskStatus(ctx context.Context, d *domxml.Domain, active bool, v *vmapi.VM) {
	ks, err := m.readKept(d.UUID)
	if err != nil {
		v.Problems = append(v.Problems, err.Error())
	}
	var opened map[string]bool
	var openErr error
	asked := false
	for _, dk := range d.Disks {
		vd := vmapi.Disk{Target: dk.Target, File: dk.Source, Format: dk.DriverType}
		for _, k := range ks {
			if k.Target == dk.Target {
				vd.Originals = append(vd.Originals, k.Path)
			}
		}
		o, ok := d.Metadata.Object(domxml.DiskObject(dk.Target))
		if !ok {
			if dk.Encryption != nil {
				vd.Note = "encrypted, but not by nkp"
			} else if d.Metadata != nil {
				vd.Note = "not encrypted"
			}
			v.Disks = append(v.Disks, vd)
			continue
		}
		vd.Protected, vd.KeyID, vd.KDKVersion = true, o.KeyID, o.KDKVersion
		for _, vo := range v.Objects {
			if vo.Name == o.Name {
				vd.Primary = vo.Primary
			}
		}
		if want := domxml.SecretUUID(d.UUID, o.KeyID); dk.Encryption == nil || dk.Encryption.SecretUUID != want {
			v.Problems = append(v.Problems, fmt.Sprintf("disk %s: its metadata names key %s, but its <encryption> does not name that key's secret %s: run nkpctl vm unprotect and protect again, or restore the disk with virsh edit", dk.Target, o.KeyID, want))
		}
		switch {
		case active:
			if !asked {
				opened, openErr = m.cfg.Libvirt.DiskEncryption(ctx, d.UUID)
				asked = true
			}
			if openErr != nil {
				v.Problems = append(v.Problems, fmt.Sprintf("disk %s: asking QEMU through libvirt how it opened the disk: %v", dk.Target, openErr))
				break
			}
			if enc, found := opened[dk.Target]; found {
				vd.OpenedEncrypted = &enc
				if !enc {
					v.Problems = append(v.Problems, fmt.Sprintf("disk %s (key %s): QEMU opened it unencrypted", dk.Target, o.KeyID))
				}
			}
		case dk.Source != "":
			f, err := imgFormat(dk.DriverType, true)
			if err != nil {
				v.Problems = append(v.Problems, fmt.Sprintf("disk %s: %v", dk.Target, err))
				break
			}
			key, err := m.diskKey(ctx, d.Name, d.UUID, o)
			if err != nil {
				v.Problems = append(v.Problems, fmt.Sprintf("disk %s: %v", dk.Target, err))
				break
			}
			img := qemuimg.Image{Path: dk.Source, Format: f, Key: key}
			info, err := m.qi().Info(ctx, img)
			if err == nil {
				err = m.qi().Unlock(ctx, img) // info does not try the key
			}
			clear(key)
			if err != nil {
				v.Problems = append(v.Problems, fmt.Sprintf("disk %s (key %s): %v", dk.Target, o.KeyID, err))
				break
			}
			if l := info.LUKS; l != nil {
				vd.LUKS = &vmapi.LUKS{Cipher: l.CipherAlg + "-" + l.CipherMode, IVGen: l.IVGenAlg, Hash: l.HashAlg, ActiveSlots: l.ActiveSlots()}
				for _, sl := range l.Slots {
					if sl.Active {
						vd.LUKS.Iters = sl.Iters
						break
					}
				}
			}
		}
		v.Disks = append(v.Disks, vd)
	}
}

// BlockEncrypted reads QMP query-block's answer (queryBlock, the whole {"return": […]}
// object) against a running domain's live XML: for each disk target, whether QEMU opened
// it encrypted. Devices are matched by libvirt's alias, which QEMU reports as the qdev
// ID or inside its canonical path (/machine/peripheral/ALIAS/virtio-backend).
func BlockEncrypted(liveXML, queryBlock []byte) (map[string]bool, error) {
	d, err := domxml.Parse(liveXML)
	if err != nil {
		return nil, err
	}
	var qb struct {
		Return []struct {
			Device   string `json:"device"`
			QDev     string `json:"qdev"`
			Inserted *struct {
				Encrypted bool `json:"encrypted"`
			} `json:"inserted"`
		} `json:"return"`
	}
	if len(queryBlock) > 4<<20 {
		return nil, fmt.Errorf("query-block: %d bytes is more than a reply can be", len(queryBlock))
	}
	if err := json.Unmarshal(queryBlock, &qb); err != nil {
		return nil, fmt.Errorf("query-block: not QEMU's JSON: %w", err)
	}
	out := map[string]bool{}
	for _, dk := range d.Disks {
		if dk.Alias == "" {
			continue
		}
		for _, b := range qb.Return {
			if b.Inserted == nil {
				continue
			}
			if b.QDev == dk.Alias || strings.HasSuffix(b.QDev, "/"+dk.Alias) || strings.Contains(b.QDev, "/"+dk.Alias+"/") || b.Device == "drive-"+dk.Alias {
				out[dk.Target] = b.Inserted.Encrypted
			}
		}
	}
	return out, nil
}
