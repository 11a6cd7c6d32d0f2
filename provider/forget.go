package provider

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
)

// ForgetResult is what a forget removed from the catalog and what it left.
type ForgetResult struct {
	// Removed are the objects removed, as they were.
	Removed []Object
	// Others are the VM's objects that another host owns (ForgetVM leaves them: the VM
	// lives there now, or was protected there).
	Others []Object
}

// ForgetVM removes, in one transaction, every catalog object of VM vmUUID that host
// hostID owns: the host's way out for a VM deleted for good (nkpctl vm forget). Objects of
// the VM that another host owns are left and returned in Others: that host took the VM
// over (MoveVM) or protected it, so it may still run there and need its KDK version. A
// VM without objects of this host is not an error (Removed is empty): a forget run again
// after a crash finds nothing left to do. Each removal is audited as unregister.
func (p *Provider) ForgetVM(ctx context.Context, hostID, vmUUID string) (ForgetResult, error) {
	vmUUID = strings.ToLower(vmUUID)
	if err := checkUUID("VM UUID", vmUUID); err != nil {
		return ForgetResult{}, fmt.Errorf("forget VM: %w", err)
	}
	var res ForgetResult
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		res = ForgetResult{}
		if _, err := liveHost(tx, hostID); err != nil {
			return err
		}
		objs, err := listObjects(tx, vmUUID+"/")
		if err != nil {
			return err
		}
		for _, o := range objs {
			if o.HostID != hostID {
				res.Others = append(res.Others, o)
				continue
			}
			key := objectKey(o.VMUUID, o.Name)
			if err := tx.Delete(bucketObjects, key); err != nil {
				return err
			}
			if err := a.add(tx, audit.Event{Kind: audit.KindUnregister, Actor: "host:" + hostID, Subject: key, Details: map[string]string{
				"via": "forget", "key_id": o.KeyID, "kdk_version": strconv.Itoa(o.KDKVersion),
			}}); err != nil {
				return err
			}
			res.Removed = append(res.Removed, o)
		}
		return nil
	})
	if err != nil {
		return ForgetResult{}, fmt.Errorf("forget VM %s: %w", vmUUID, err)
	}
	return res, nil
}

// ForgetObjects is the administrator's way out for a host that is gone: it removes the
// catalog objects of VM vmUUID (only object name, if not "") that a revoked or no longer
// enrolled host registered, so that they stop keeping their KDK versions from being
// retired. It refuses (ErrInUse, nothing removed) when any matching object belongs to a
// live host: that host forgets its own VMs (nkpctl vm forget), or is revoked first if it
// is gone. No matching object gives ErrNotFound. Each removal is audited as forget with
// the acting administrator, the host and the key.
func (p *Provider) ForgetObjects(ctx context.Context, vmUUID, name string) ([]Object, error) {
	vmUUID = strings.ToLower(vmUUID)
	if err := checkUUID("VM UUID", vmUUID); err != nil {
		return nil, fmt.Errorf("forget objects: %w", err)
	}
	if name != "" {
		if err := checkObjectName(name); err != nil {
			return nil, fmt.Errorf("forget objects of VM %s: %w", vmUUID, err)
		}
	}
	var out []Object
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		out = nil
		if _, err := readMeta(tx); err != nil {
			return err
		}
		objs, err := listObjects(tx, vmUUID+"/")
		if err != nil {
			return err
		}
		states := map[string]string{}
		for _, o := range objs {
			if name != "" && o.Name != name {
				continue
			}
			st, ok := states[o.HostID]
			if !ok {
				h, err := readHost(tx, o.HostID)
				switch {
				case errors.Is(err, ErrHostUnknown):
					st = "unknown"
				case err != nil:
					return err
				case h.Revoked != nil:
					st = "revoked"
				default:
					return fmt.Errorf("%w: VM %s %s belongs to host %s (%s), which is enrolled and not revoked: "+
						"forget the VM on that host (nkpctl vm forget %s), or, if the host is gone for good, revoke it first (nkpctl provider revoke %s); nothing was removed",
						ErrInUse, o.VMUUID, o.Name, o.HostID, h.Hostname, o.VMUUID, o.HostID)
				}
				states[o.HostID] = st
			}
			key := objectKey(o.VMUUID, o.Name)
			if err := tx.Delete(bucketObjects, key); err != nil {
				return err
			}
			if err := a.add(tx, audit.Event{Kind: audit.KindForget, Actor: actorOf(ctx), Subject: key, Details: map[string]string{
				"host_id": o.HostID, "host": st, "key_id": o.KeyID, "kdk_version": strconv.Itoa(o.KDKVersion),
			}}); err != nil {
				return err
			}
			out = append(out, o)
		}
		if len(out) == 0 {
			what := "objects"
			if name != "" {
				what = "object " + name
			}
			return fmt.Errorf("%w: the catalog has no %s of VM %s (nkpctl provider objects --vm %s lists them)", ErrNotFound, what, vmUUID, vmUUID)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("forget objects: %w", err)
	}
	return out, nil
}
