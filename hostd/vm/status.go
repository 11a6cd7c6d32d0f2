package vm

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

// Status reports a domain: its nkp objects (key IDs, KDK versions, whether each is on
// the primary version), whether it runs and, if so, whether its TPM is present and
// answering (asked through libvirt), and anything that needs an operator.
func (m *Manager) Status(ctx context.Context, domain string) (vmapi.VM, error) {
	_, d, err := m.lookup(ctx, domain)
	if err != nil {
		return vmapi.VM{}, err
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
	active, err := m.cfg.Libvirt.IsActive(ctx, d.UUID)
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: asking libvirt whether it runs: %w: %w", d.Name, ErrUnavailable, err)
	}
	v.Running = active
	if d.Metadata == nil {
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
		v.Problems = append(v.Problems, fmt.Sprintf("the state directory of vTPM key %s is missing on this host (%s): the VM's TPM starts empty here unless it migrates in", obj.KeyID, StateDir(m.cfg.VTPMDir, d.UUID, obj.KeyID)))
	}
	if !active {
		v.TPM = "stopped"
		return v, nil
	}
	if err := m.cfg.Libvirt.TPMCheck(ctx, d.UUID); err != nil {
		v.TPM = fmt.Sprintf("not answering: %v", err)
		v.Problems = append(v.Problems, fmt.Sprintf("the running VM's TPM (key %s) does not answer: %v", obj.KeyID, err))
	} else {
		v.TPM = "ok"
	}
	return v, nil
}

// List reports every protected domain (and every domain with an unfinished operation).
func (m *Manager) List(ctx context.Context) ([]vmapi.VM, error) {
	uuids, err := m.cfg.Libvirt.Domains(ctx)
	if err != nil {
		return nil, fmt.Errorf("vm: listing domains: %w: %w", ErrUnavailable, err)
	}
	out := []vmapi.VM{}
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
