package provider

import (
	"context"
	"errors"
	"fmt"
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
// KDK (after a rekey) replaces the entry.
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
		h, err := readHost(tx, hostID)
		if err != nil {
			return err
		}
		if h.Revoked != nil {
			return fmt.Errorf("host %s: %w", hostID, ErrHostRevoked)
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
		case err == nil && old.KeyID == o.KeyID && old.KDKID == o.KDKID:
			return nil // already registered
		case err != nil && !errors.Is(err, store.ErrNotFound):
			return err
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

// UnregisterObject removes a catalog entry (the VM or disk was deleted). A missing entry
// gives ErrNotFound.
func (p *Provider) UnregisterObject(ctx context.Context, hostID, vmUUID, name string) error {
	vmUUID = strings.ToLower(vmUUID)
	key := objectKey(vmUUID, name)
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		if _, err := tx.Get(bucketObjects, key); errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("%w: the catalog has no object %s for VM %s", ErrNotFound, name, vmUUID)
		} else if err != nil {
			return err
		}
		if err := tx.Delete(bucketObjects, key); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: "unregister", Actor: "host:" + hostID, Subject: key})
	})
	if err != nil {
		return fmt.Errorf("unregister object %s of VM %s: %w", name, vmUUID, err)
	}
	return nil
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
