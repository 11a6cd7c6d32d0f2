package provider

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
)

// checkObjectName accepts "vtpm" and "disk:<target>" with a target of 1 to 32 bytes of
// [a-z0-9_-] (libvirt's disk target names: vda, sdb, ...).
func checkObjectName(name string) error {
	if name == "vtpm" {
		return nil
	}
	target, ok := strings.CutPrefix(name, "disk:")
	if ok && len(target) >= 1 && len(target) <= 32 {
		for _, c := range []byte(target) {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
				ok = false
				break
			}
		}
		if ok {
			return nil
		}
	}
	return fmt.Errorf("object name %.40q: %w: want \"vtpm\" or \"disk:<target>\" such as \"disk:vda\"", name, ErrBadRequest)
}

func checkUUID(what, s string) error {
	if _, err := uuid.Parse(s); err != nil || len(s) != 36 {
		return fmt.Errorf("%s %.40q: %w: want a UUID", what, s, ErrBadRequest)
	}
	return nil
}

// RegisterObject records that host hostID protects obj (a VM's vTPM or disk) with a key
// derived from KDK obj.KDKID. Registering the same object again with another key ID or
// KDK (after a rekey) replaces the entry. A host changes only its own objects: an object
// another host registered is refused with ErrNotOwner (a migrated VM's new host takes its
// objects over with MoveVM first).
func (p *Provider) RegisterObject(ctx context.Context, hostID string, obj Object) error {
	obj.VMUUID, obj.KeyID, obj.KDKID = strings.ToLower(obj.VMUUID), strings.ToLower(obj.KeyID), strings.ToLower(obj.KDKID)
	if err := checkUUID("VM UUID", obj.VMUUID); err != nil {
		return fmt.Errorf("register object: %w", err)
	}
	if err := checkObjectName(obj.Name); err != nil {
		return fmt.Errorf("register object of VM %s: %w", obj.VMUUID, err)
	}
	if err := checkUUID("key ID", obj.KeyID); err != nil {
		return fmt.Errorf("register object %s of VM %s: %w", obj.Name, obj.VMUUID, err)
	}
	if err := checkUUID("KDK ID", obj.KDKID); err != nil {
		return fmt.Errorf("register object %s of VM %s: %w", obj.Name, obj.VMUUID, err)
	}
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		if _, err := liveHost(tx, hostID); err != nil {
			return err
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		o := obj
		o.KDKVersion = 0
		for _, k := range kdks {
			if k.ID == o.KDKID {
				if k.Retired != nil {
					return fmt.Errorf("KDK %s (version %d) is retired: %w; derive the key from the primary version", k.ID, k.Version, ErrNotFound)
				}
				o.KDKVersion = k.Version
			}
		}
		if o.KDKVersion == 0 {
			return fmt.Errorf("KDK %s: %w: this provider has no such KDK", o.KDKID, ErrNotFound)
		}
		key := objectKey(o.VMUUID, o.Name)
		var old Object
		switch err := getJSON(tx, bucketObjects, key, &old); {
		case err != nil && !errors.Is(err, store.ErrNotFound):
			return err
		case err == nil && old.HostID != hostID:
			return notOwner(old, hostID)
		case err == nil && old.KeyID == o.KeyID && old.KDKID == o.KDKID:
			return nil // already registered
		}
		o.HostID, o.Registered = hostID, a.now.UTC()
		if err := putJSON(tx, bucketObjects, key, o); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindRegister, Actor: "host:" + hostID, Subject: key, Details: map[string]string{
			"key_id": o.KeyID, "kdk_id": o.KDKID, "kdk_version": strconv.Itoa(o.KDKVersion),
		}})
	})
	if err != nil {
		return fmt.Errorf("register object %s of VM %s: %w", obj.Name, obj.VMUUID, err)
	}
	return nil
}

// notOwner is the refusal of host hostID changing o, which another host registered.
func notOwner(o Object, hostID string) error {
	return fmt.Errorf("%w: VM %s %s was registered by host %s, not by host %s; a host changes only its own objects "+
		"(if the VM migrated to host %s, that host takes its objects over with MoveVM, POST /v1/host/moves, first)",
		ErrNotOwner, o.VMUUID, o.Name, o.HostID, hostID, hostID)
}

// liveHost reads host hostID and refuses it if it is unknown or revoked.
func liveHost(tx store.Tx, hostID string) (hostRecord, error) {
	h, err := readHost(tx, hostID)
	if err != nil {
		return h, err
	}
	if h.Revoked != nil {
		return h, fmt.Errorf("host %s: %w", hostID, ErrHostRevoked)
	}
	return h, nil
}

// UnregisterObject removes a catalog entry of host hostID (the VM or disk was deleted).
// A missing entry gives ErrNotFound, another host's entry ErrNotOwner.
func (p *Provider) UnregisterObject(ctx context.Context, hostID, vmUUID, name string) error {
	vmUUID = strings.ToLower(vmUUID)
	key := objectKey(vmUUID, name)
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		if _, err := liveHost(tx, hostID); err != nil {
			return err
		}
		var o Object
		if err := getJSON(tx, bucketObjects, key, &o); errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("%w: the catalog has no object %s for VM %s", ErrNotFound, name, vmUUID)
		} else if err != nil {
			return err
		}
		if o.HostID != hostID {
			return notOwner(o, hostID)
		}
		if err := tx.Delete(bucketObjects, key); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindUnregister, Actor: "host:" + hostID, Subject: key})
	})
	if err != nil {
		return fmt.Errorf("unregister object %s of VM %s: %w", name, vmUUID, err)
	}
	return nil
}

// MoveVM makes host hostID the owner of every catalog object of VM vmUUID: the explicit
// step a VM's new host takes after a migration, before it changes those objects. The
// catalog must hold objects of that VM (ErrNotFound otherwise: a new VM's objects are
// registered, not moved). The audit log records the move with the hosts it came from;
// objects the host owns already are left as they are (moving twice records nothing new,
// and when the host owns them all, nothing is written: one read answers).
// It returns the VM's objects as they are now.
func (p *Provider) MoveVM(ctx context.Context, hostID, vmUUID string) ([]Object, error) {
	vmUUID = strings.ToLower(vmUUID)
	if err := checkUUID("VM UUID", vmUUID); err != nil {
		return nil, fmt.Errorf("move VM: %w", err)
	}
	// Most calls find the objects the host's already (a host claims a VM's objects at
	// each start of the VM): answered from one read, nothing written.
	var out []Object
	owned := false
	err := p.st.View(ctx, func(tx store.Tx) error {
		if _, err := liveHost(tx, hostID); err != nil {
			return err
		}
		objs, err := listObjects(tx, vmUUID+"/")
		if err != nil {
			return err
		}
		owned = len(objs) > 0 && !slices.ContainsFunc(objs, func(o Object) bool { return o.HostID != hostID })
		out = objs
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("move VM %s to host %s: %w", vmUUID, hostID, err)
	}
	if owned {
		return out, nil
	}
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		out = nil
		if _, err := liveHost(tx, hostID); err != nil {
			return err
		}
		objs, err := listObjects(tx, vmUUID+"/")
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			return fmt.Errorf("%w: the catalog holds no objects of VM %s; only a VM the catalog holds can be moved (register a new VM's objects instead)", ErrNotFound, vmUUID)
		}
		var from, names []string
		for _, o := range objs {
			if o.HostID != hostID {
				if !slices.Contains(from, o.HostID) {
					from = append(from, o.HostID)
				}
				names = append(names, o.Name)
				o.HostID = hostID
				if err := putJSON(tx, bucketObjects, objectKey(o.VMUUID, o.Name), o); err != nil {
					return err
				}
			}
			out = append(out, o)
		}
		if len(names) == 0 {
			return nil
		}
		return a.add(tx, audit.Event{Kind: audit.KindMove, Actor: "host:" + hostID, Subject: vmUUID, Details: map[string]string{
			"from_hosts": strings.Join(from, ","), "to_host": hostID, "objects": strings.Join(names, ","),
		}})
	})
	if err != nil {
		return nil, fmt.Errorf("move VM %s to host %s: %w", vmUUID, hostID, err)
	}
	return out, nil
}

// Objects lists catalog entries matching f, ordered by VM UUID and name.
func (p *Provider) Objects(ctx context.Context, f ObjectFilter) ([]Object, error) {
	prefix := ""
	if f.VMUUID != "" {
		f.VMUUID = strings.ToLower(f.VMUUID)
		if err := checkUUID("VM UUID", f.VMUUID); err != nil {
			return nil, fmt.Errorf("objects: %w", err)
		}
		prefix = f.VMUUID + "/"
	}
	var out []Object
	err := p.st.View(ctx, func(tx store.Tx) error {
		if _, err := readMeta(tx); err != nil {
			return err
		}
		objs, err := listObjects(tx, prefix)
		for _, o := range objs {
			if f.match(o) {
				out = append(out, o)
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("objects: %w", err)
	}
	return out, nil
}
