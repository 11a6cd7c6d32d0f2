package vm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/swtpm/state"
)

// Refusals of forget.
var (
	ErrDefined      = errors.New("libvirt still defines the domain")
	ErrNotConfirmed = errors.New("not confirmed")
	// ErrRevoked: the provider no longer accepts this host (revoked, or unknown to it),
	// so forget cannot change the catalog; forget --local-only still can change the host.
	ErrRevoked = errors.New("the provider no longer accepts this host")
)

// Forget removes what nkp keeps for a VM that libvirt no longer defines on this host and
// that is gone for good (domain: its UUID, or the name it had, found as Finalize finds
// it): its objects in the provider's catalog that this host owns, the libvirt secrets of
// its disks, the original disk files kept for it (except one another domain names or a
// process has open, as Finalize), its vTPM state directory and its journal. confirm must
// be true: the vTPM state holds the TPM's secrets, which nothing can bring back. It is
// ForgetWith without LocalOnly.
//
// The catalog goes first: if the provider cannot be reached, nothing changes on this
// host. The operation is journaled (opForget): a crash at any step leaves the journal,
// and hostd's next start, or the next forget, finishes it. If libvirt defines the VM
// again before that, the objects its definition names are registered again and its
// state is kept (see the package doc, "Forget").
func (m *Manager) Forget(ctx context.Context, domain string, confirm bool) (vmapi.Forgotten, error) {
	return m.ForgetWith(ctx, domain, vmapi.ForgetRequest{Confirm: confirm})
}

// ForgetWith is Forget as req asks. With req.LocalOnly the provider is not asked at all
// (a host the provider revoked, or one that cannot reach it): only this host's side
// goes — disks' secrets, kept files, vTPM state, journal — and the answer lists the
// objects the catalog still holds for the VM, as far as this host knows them, with the
// commands that remove them (an administrator's nkpctl provider objects forget, or a
// later forget on this host while the provider still accepts it).
func (m *Manager) ForgetWith(ctx context.Context, domain string, req vmapi.ForgetRequest) (vmapi.Forgotten, error) {
	m.lock("forget of "+domain, nil)
	defer m.unlock()
	u, name, err := m.resolveUndefined(ctx, domain)
	if err != nil {
		return vmapi.Forgotten{}, err
	}
	if !req.Confirm {
		if req.LocalOnly {
			return vmapi.Forgotten{}, fmt.Errorf("vm %s: %w: forget --local-only destroys the VM's vTPM state on this host (its TPM's keys and sealed secrets, which nothing can bring back) and the original disk files kept for it, and leaves its objects in the provider's catalog for an administrator to remove; nothing was changed: confirm it (nkpctl vm forget %s --local-only --yes)", vmRef(name, u), ErrNotConfirmed, u)
		}
		return vmapi.Forgotten{}, fmt.Errorf("vm %s: %w: forget destroys the VM's vTPM state (its TPM's keys and sealed secrets, which nothing can bring back), the original disk files kept for it, and its objects in the provider's catalog, after which their KDK version can be retired; nothing was changed: confirm it (nkpctl vm forget %s --yes)", vmRef(name, u), ErrNotConfirmed, u)
	}
	e := &entry{Op: opForget, Domain: name, UUID: u}
	var prev *entry
	if m.j.exists(u) {
		if prev, err = m.j.read(u); err != nil {
			return vmapi.Forgotten{}, fmt.Errorf("vm %s: %w", vmRef(name, u), err)
		}
		if prev.Op == opForget {
			cp := *prev
			e = &cp // a forget interrupted: this one finishes it
		} else {
			// An operation interrupted on a domain undefined since: forget takes its
			// place, and says which of its files it leaves.
			e.Interrupted, e.Disks, e.Staging, e.Aside = prev.Op, prev.Disks, prev.Staging, prev.Aside
			if prev.Domain != "" {
				e.Domain = prev.Domain
			}
		}
	}
	e.LocalOnly = req.LocalOnly
	if e.LocalOnly && len(e.Left) == 0 {
		e.Left = m.localObjects(u)
	}
	if err := m.j.write(e); err != nil {
		return vmapi.Forgotten{}, err
	}
	m.step(opForget, "journal")
	f, err := m.forgetLocked(ctx, e)
	if errors.Is(err, errCatalogUnchanged) {
		// Nothing changed: the journal goes back to what it was.
		var rerr error
		if prev != nil {
			rerr = m.j.write(prev)
		} else {
			rerr = m.j.remove(u)
		}
		if rerr != nil {
			m.log.Warn("vm: forget: restoring the journal", "uuid", u, "err", rerr)
		}
	}
	return f, err
}

// localObjects are the catalog objects of VM vmUUID as this host knows them without
// asking the provider: from its record, else the vTPM key IDs of its state directories.
func (m *Manager) localObjects(vmUUID string) []domxml.Object {
	if r, err := m.readRecord(vmUUID); err == nil && r != nil && len(r.Objects) > 0 {
		return r.Objects
	}
	var out []domxml.Object
	for _, k := range m.stateKeys(vmUUID) {
		out = append(out, domxml.Object{Name: domxml.ObjectVTPM, KeyID: k})
	}
	return out
}

// errCatalogUnchanged marks a forget that stopped before the catalog changed.
var errCatalogUnchanged = errors.New("the catalog is unchanged")

// vmRef names a VM in a sentence: "NAME (UUID)", or the UUID.
func vmRef(name, uuid string) string {
	if name == "" || name == uuid {
		return uuid
	}
	return fmt.Sprintf("%q (%s)", name, uuid)
}

// resolveUndefined finds the VM domain names, which libvirt must not define: its UUID
// (lowercase) and the name it had ("" if unknown). A name is found through the VMs'
// records, kept files and journal entries (undefinedNamed).
func (m *Manager) resolveUndefined(ctx context.Context, domain string) (string, string, error) {
	_, d, err := m.lookup(ctx, domain)
	if err == nil {
		return "", "", fmt.Errorf("vm %q: %w (%s), and forget is only for a VM that is gone from this host: to keep the VM without nkp, nkpctl vm unprotect %s; to delete it, virsh undefine %s (--remove-all-storage removes its disks too; virsh destroy first if it runs), then nkpctl vm forget %s", domain, ErrDefined, d.UUID, d.Name, d.Name, d.UUID)
	}
	if !errors.Is(err, ErrNoDomain) {
		return "", "", err
	}
	if u := strings.ToLower(domain); kdk.CheckUUID(u) == nil {
		return u, m.knownName(u), nil
	}
	found := m.undefinedNamed(ctx, domain)
	switch len(found) {
	case 0:
		return "", "", fmt.Errorf("vm %q: %w: libvirt defines no such domain, and nkp knows no VM of that name that libvirt no longer defines (hostd records a VM's name when it protects it, at each of its starts and status; a VM last seen by an older hostd is known only by its UUID): give the VM's UUID (nkpctl vm status lists the VMs whose state nkp keeps)", domain, ErrNoDomain)
	case 1:
		return found[0], domain, nil
	}
	var which []string
	for _, u := range found {
		which = append(which, fmt.Sprintf("%s (%s)", u, m.keeps(u)))
	}
	return "", "", fmt.Errorf("vm %q: %w: libvirt defines no such domain, and %d VMs that libvirt no longer defines had that name: %s; run nkpctl vm forget with the UUID of the one that is gone (nkpctl vm status UUID shows what nkp keeps of each)", domain, ErrBadArgument, len(found), strings.Join(which, "; "))
}

// undefinedNamed lists, sorted, the VMs that had the name name (as their records,
// journal entries and kept files say) and that libvirt no longer defines; one that
// libvirt defines under another name now, or did not answer for, is left out.
func (m *Manager) undefinedNamed(ctx context.Context, name string) []string {
	var found []string
	for _, u := range m.knownUUIDs() {
		if !slices.Contains(m.knownNames(u), name) {
			continue
		}
		if _, _, err := m.lookup(ctx, u); !errors.Is(err, ErrNoDomain) {
			continue // still defined (under another name now), or libvirt did not answer
		}
		found = append(found, u)
	}
	return found
}

// keeps says in a few words what nkp keeps of VM vmUUID on this host.
func (m *Manager) keeps(vmUUID string) string {
	var what []string
	if keys := m.stateKeys(vmUUID); len(keys) > 0 {
		what = append(what, "vTPM state")
	}
	if ks, _ := m.readKept(vmUUID); len(ks) > 0 {
		what = append(what, fmt.Sprintf("%d kept disk file(s)", len(ks)))
	}
	if e, err := m.j.read(vmUUID); err == nil {
		what = append(what, "an unfinished "+e.Op)
	}
	if r, _ := m.readRecord(vmUUID); r != nil && len(r.Objects) > 0 {
		var names []string
		for _, o := range r.Objects {
			names = append(names, o.Name)
		}
		what = append(what, "objects "+strings.Join(names, ", "))
	}
	if len(what) == 0 {
		return "nothing but its name"
	}
	return strings.Join(what, ", ")
}

// knownUUIDs lists the VMs with a record, kept files or a journal entry.
func (m *Manager) knownUUIDs() []string {
	us := append(m.keptUUIDs(), m.recordUUIDs()...)
	if js, err := m.j.list(); err == nil {
		us = append(us, js...)
	}
	slices.Sort(us)
	return slices.Compact(us)
}

// knownNames are the names VM vmUUID had as its record (the latest), its journal entry
// and its kept files say, without repeats.
func (m *Manager) knownNames(vmUUID string) []string {
	var names []string
	add := func(n string) {
		if n != "" && n != vmUUID && !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	if r, err := m.readRecord(vmUUID); err == nil && r != nil {
		add(r.Name)
	}
	if e, err := m.j.read(vmUUID); err == nil {
		add(e.Domain)
	}
	ks, _ := m.readKept(vmUUID)
	for _, k := range ks {
		add(k.VM)
	}
	return names
}

// knownName is the name VM vmUUID had last as far as nkp knows; "" if it knows none.
func (m *Manager) knownName(vmUUID string) string {
	if ns := m.knownNames(vmUUID); len(ns) > 0 {
		return ns[0]
	}
	return ""
}

// forgetLocked runs (or finishes) the forget journaled in e. An error wrapping
// errCatalogUnchanged means nothing was changed.
func (m *Manager) forgetLocked(ctx context.Context, e *entry) (vmapi.Forgotten, error) {
	u := e.UUID
	ref := vmRef(e.Domain, u)
	again := "nkpctl vm forget " + u + " --yes" // what finishes this forget
	if e.LocalOnly {
		again += " --local-only"
	}
	f := vmapi.Forgotten{UUID: u, Domain: e.Domain, Unregistered: []vmapi.CatalogObject{}}
	if e.Domain == u {
		f.Domain = ""
	}
	// Defined again since the forget began (recovery, or a define racing it): the
	// domain's objects must be in the catalog again and its state stays.
	if x, err := m.cfg.Libvirt.DomainXML(ctx, u); err == nil {
		if err := m.undoForget(ctx, e, x); err != nil {
			return f, err
		}
		return f, fmt.Errorf("vm %s: %w again, so forget stopped: its state stays and the objects its definition names are in the catalog again; to delete it, virsh undefine %s, then nkpctl vm forget %s --yes", ref, ErrDefined, u, u)
	} else if !errors.Is(err, ErrNoDomain) {
		return f, fmt.Errorf("vm %s: forget: asking libvirt whether it defines the VM: %w: %w; nothing more was changed, run the command again", ref, ErrUnavailable, err)
	}
	var res apiv1.ForgetResponse
	var err error
	if e.LocalOnly {
		// Not asked: the objects this host knew of stay in the catalog.
		f.LocalOnly = true
		for _, o := range e.Left {
			f.LeftInCatalog = append(f.LeftInCatalog, vmapi.CatalogObject{Name: o.Name, KeyID: o.KeyID, KDKVersion: o.KDKVersion})
		}
	} else if res, err = m.cfg.Catalog.ForgetVM(ctx, u); err != nil {
		if client.IsCode(err, apiv1.CodeHostRevoked) || client.IsCode(err, apiv1.CodeHostUnknown) {
			return f, fmt.Errorf("vm %s: %w: %w: %w, so it cannot remove the VM's catalog objects; nothing was changed on this host: remove this host's side with nkpctl vm forget %s --local-only --yes, and have an administrator remove the catalog's (nkpctl provider objects forget --vm %s --yes)", ref, errCatalogUnchanged, err, ErrRevoked, u, u)
		}
		return f, fmt.Errorf("vm %s: %w: %w: removing its objects from the provider's catalog: %w; nothing was changed on this host (its state goes only after its catalog objects, so that a forget never leaves catalog entries behind): run nkpctl vm forget %s --yes again once nkp-hostd reaches the provider (or, if this host will never reach it again, nkpctl vm forget %s --local-only --yes, which leaves the catalog's objects to an administrator)", ref, ErrUnavailable, errCatalogUnchanged, err, u, u)
	}
	for _, o := range res.Removed {
		e.Unregistered = append(e.Unregistered, domxml.Object{Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion})
	}
	if len(res.Removed) > 0 {
		// What went, for the report of a forget finished later (a rerun finds nothing).
		if err := m.j.write(e); err != nil {
			m.log.Warn("vm: forget: recording the objects removed from the catalog", "uuid", u, "err", err)
		}
	}
	m.step(opForget, "catalog")
	for _, o := range e.Unregistered {
		f.Unregistered = append(f.Unregistered, vmapi.CatalogObject{Name: o.Name, KeyID: o.KeyID, KDKVersion: o.KDKVersion})
	}
	disks := slices.DeleteFunc(slices.Concat(e.Unregistered, e.Left), func(o domxml.Object) bool { return !isDiskObject(o) })
	for _, o := range res.Others {
		f.OtherHosts = append(f.OtherHosts, vmapi.CatalogObject{Name: o.Name, KeyID: o.KeyID, KDKVersion: o.KDKVersion, HostID: o.HostID})
		if strings.HasPrefix(o.Name, domxml.ObjectDiskPrefix) {
			disks = append(disks, domxml.Object{Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion})
		}
	}
	if m.cfg.Secrets != nil && len(disks) > 0 {
		if err := m.cfg.Secrets.Remove(ctx, u, disks); err != nil {
			return f, fmt.Errorf("vm %s: forget: its catalog objects are handled, but undefining its disks' libvirt secrets failed: %w: %w; run %s again to finish (hostd retries at its start too)", ref, ErrUnavailable, err, again)
		}
	}
	m.step(opForget, "secrets")
	removed, _, problems, err := m.removeKept(ctx, u, ref, nil)
	if err != nil {
		return f, fmt.Errorf("%w; run %s again to finish", err, again)
	}
	f.FilesRemoved, f.Problems = removed, problems
	m.step(opForget, "kept")
	dir := filepath.Join(m.cfg.VTPMDir, u)
	if _, err := os.Lstat(dir); err == nil {
		for _, k := range m.stateKeys(u) {
			sd, err := state.Open(filepath.Join(dir, k), state.Options{Log: m.log})
			if err != nil {
				if errors.Is(err, state.ErrLocked) {
					return f, fmt.Errorf("vm %s: forget: %w: its vTPM state %s is in use (an nkp-swtpm of this VM still runs on this host: is it running as a transient domain, or migrating?): %w; stop it, then run %s again", ref, ErrRunning, filepath.Join(dir, k), err, again)
				}
				return f, fmt.Errorf("vm %s: forget: opening its vTPM state %s: %w; run %s again once fixed", ref, filepath.Join(dir, k), err, again)
			}
			sd.Close()
		}
		if err := os.RemoveAll(dir); err != nil {
			return f, fmt.Errorf("vm %s: forget: removing its vTPM state %s: %w; run %s again", ref, dir, err, again)
		}
		if err := atomicfile.SyncDir(m.cfg.VTPMDir); err != nil {
			return f, fmt.Errorf("vm %s: forget: %w", ref, err)
		}
		f.StateRemoved = dir
	}
	m.step(opForget, "state")
	if e.Staging != "" {
		// An interrupted unprotect's staging copy in libvirt's swtpm root: nkp's own.
		if err := os.RemoveAll(e.Staging); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return f, fmt.Errorf("vm %s: forget: removing %s: %w; run %s again", ref, e.Staging, err, again)
		}
	}
	var notes []string
	switch n := len(f.Unregistered); {
	case e.LocalOnly:
		var names []string
		for _, o := range e.Left {
			if o.KDKVersion > 0 {
				names = append(names, fmt.Sprintf("%s (key %s, KDK version %d)", o.Name, o.KeyID, o.KDKVersion))
			} else {
				names = append(names, fmt.Sprintf("%s (key %s)", o.Name, o.KeyID))
			}
		}
		what := "whatever objects of this VM it holds"
		if len(names) > 0 {
			what = "this VM's objects " + strings.Join(names, ", ") + " (as this host knew them)"
		}
		notes = append(notes, fmt.Sprintf("local only: the provider was not asked, and its catalog still holds %s, which keep their KDK version from being retired: an administrator removes them with nkpctl provider objects forget --vm %s --yes (the provider allows it once this host is revoked); while the provider still accepts this host, nkpctl vm forget %s --yes here removes them instead", what, u, u))
	case n > 0:
		var names []string
		for _, o := range f.Unregistered {
			names = append(names, fmt.Sprintf("%s (KDK version %d)", o.Name, o.KDKVersion))
		}
		notes = append(notes, "removed from the provider's catalog: "+strings.Join(names, ", "))
	default:
		notes = append(notes, "the provider's catalog held no objects of this VM from this host")
	}
	if len(f.OtherHosts) > 0 {
		hosts := []string{}
		for _, o := range f.OtherHosts {
			if !slices.Contains(hosts, o.HostID) {
				hosts = append(hosts, o.HostID)
			}
		}
		notes = append(notes, fmt.Sprintf("%d catalog object(s) of this VM belong to host %s and stay: the VM moved there (or was protected there), and only that host forgets them", len(f.OtherHosts), strings.Join(hosts, ", ")))
	}
	if f.StateRemoved != "" {
		notes = append(notes, "vTPM state "+f.StateRemoved+" removed")
	}
	if len(f.FilesRemoved) > 0 {
		notes = append(notes, "kept original disk files removed: "+strings.Join(f.FilesRemoved, ", "))
	}
	if e.Interrupted != "" {
		var files []string
		for _, de := range e.Disks {
			for _, p := range []string{de.Orig, de.New} {
				if _, err := os.Lstat(p); p != "" && err == nil && !slices.Contains(files, p) {
					files = append(files, p)
				}
			}
		}
		p := fmt.Sprintf("an interrupted %s of this VM was dropped", e.Interrupted)
		if len(files) > 0 {
			p += "; nkp cannot tell which of its disk files the VM used last and leaves them: " + strings.Join(files, ", ")
		}
		if e.Aside != "" {
			p += "; libvirt's earlier swtpm state is kept in " + e.Aside
		}
		f.Problems = append(f.Problems, p)
	}
	if len(f.Unregistered) == 0 && len(f.OtherHosts) == 0 && f.StateRemoved == "" && len(f.FilesRemoved) == 0 && len(f.Problems) == 0 {
		if e.LocalOnly {
			notes = append([]string{fmt.Sprintf("nothing to forget on this host: nkp keeps nothing of VM %s here (check the UUID: nkpctl vm status lists the VMs whose state nkp keeps)", u)}, notes...)
		} else {
			notes = []string{fmt.Sprintf("nothing to forget: nkp keeps nothing of VM %s on this host and the provider's catalog holds no object of it from this host (check the UUID: nkpctl vm status lists the VMs whose state nkp keeps)", u)}
		}
	}
	f.Note = strings.Join(notes, "; ")
	if err := m.dropRecord(u); err != nil {
		return f, fmt.Errorf("vm %s: forget: removing its record %s: %w; run %s again", ref, m.recordPath(u), err, again)
	}
	if err := m.j.remove(u); err != nil {
		return f, fmt.Errorf("vm %s: forget: removing its journal entry %s: %w", ref, m.j.path(u), err)
	}
	m.step(opForget, "done")
	m.log.Info("vm forgotten", "uuid", u, "domain", e.Domain, "local_only", e.LocalOnly, "unregistered", len(f.Unregistered), "left_in_catalog", len(f.LeftInCatalog), "other_hosts", len(f.OtherHosts), "state", f.StateRemoved, "files", f.FilesRemoved)
	return f, nil
}

// undoForget handles a forget whose VM libvirt defines again (x: its definition): the
// objects the definition names are registered again (the catalog must hold what a VM
// uses), the journal goes, and everything else stays. Secrets, kept files and state
// removed before the define are not brought back: the define came after the operator
// confirmed the forget.
func (m *Manager) undoForget(ctx context.Context, e *entry, x []byte) error {
	d, err := domxml.Parse(x)
	if err != nil {
		return fmt.Errorf("vm %s: a forget was interrupted and libvirt defines the VM again, but its definition does not parse: %w; fix it with virsh edit", e.UUID, err)
	}
	// A local-only forget removed nothing from the catalog: nothing to register again.
	if d.Metadata != nil && d.Metadata.ProviderID == m.cfg.Keys.ProviderID() && !e.LocalOnly {
		for _, o := range d.Metadata.Objects {
			if err := m.register(ctx, e.UUID, o); err != nil {
				return fmt.Errorf("vm %q: a forget was interrupted and libvirt defines the VM again: registering its object %s in the catalog again: %w: %w (retried at hostd's start and before the next nkpctl vm command on it)", d.Name, o.Name, ErrUnavailable, err)
			}
		}
	}
	if err := m.j.remove(e.UUID); err != nil {
		return err
	}
	m.remember(d)
	m.log.Warn("vm: a forget was interrupted and libvirt defines the VM again: kept, its objects registered again", "vm", d.Name, "uuid", e.UUID)
	return nil
}

// Claim makes this host the owner of the catalog objects of VM vmUUID, protected with
// keys from this host's provider, when it starts here (hostd calls it on libvirt's
// started event: a boot, a restore, an incoming migration). Ownership then follows where
// the VM last ran, and a forget on the host it left removes nothing of it: that host no
// longer owns its objects (see the package doc, "Forget"). A VM whose objects the catalog
// does not hold, or one not protected by this provider, is left alone. The provider
// answers a VM this host owns already from one read.
func (m *Manager) Claim(ctx context.Context, vmUUID string) error {
	x, err := m.cfg.Libvirt.DomainXML(ctx, vmUUID)
	if err != nil {
		return fmt.Errorf("vm %s: claiming its catalog objects: reading its definition: %w", vmUUID, err)
	}
	d, err := domxml.Parse(x)
	if err != nil || d.Metadata == nil || len(d.Metadata.Objects) == 0 {
		return nil
	}
	m.remember(d) // the name it runs under here: forget finds it by that name once undefined
	if d.Metadata.ProviderID != m.cfg.Keys.ProviderID() {
		return nil
	}
	objs, err := m.cfg.Catalog.MoveVM(ctx, d.UUID)
	if client.IsCode(err, apiv1.CodeNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vm %q: claiming its catalog objects for this host (it runs here): %w", d.Name, err)
	}
	m.log.Debug("vm: catalog objects claimed for this host", "vm", d.Name, "uuid", d.UUID, "objects", len(objs))
	return nil
}
