package provider

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
)

// Rotate makes a new KDK version primary. The provider is NotBackedUp again until the
// next Backup, which puts the new version in an archive; releases wait for it.
func (p *Provider) Rotate(ctx context.Context) (KDKVersion, error) {
	key, err := newKDK()
	if err != nil {
		return KDKVersion{}, fmt.Errorf("rotate: %w", err)
	}
	defer clear(key)
	kdkID := uuid.NewString()
	var out KDKVersion
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		next, prev := 1, 0
		for _, k := range kdks {
			if k.Version >= next {
				next = k.Version + 1
			}
			if k.Primary {
				prev = k.Version
				k.Primary = false
				if err := putJSON(tx, bucketKDKs, kdkKey(k.Version), k); err != nil {
					return err
				}
			}
		}
		sealed, err := p.sealKDK(m.ID, kdkID, key)
		if err != nil {
			return err
		}
		rec := kdkRecord{ID: kdkID, Version: next, Created: a.now.UTC(), Primary: true, Sealed: sealed}
		if err := putJSON(tx, bucketKDKs, kdkKey(next), rec); err != nil {
			return err
		}
		out = rec.public()
		return a.add(tx, audit.Event{Kind: audit.KindRotate, Actor: actorOf(ctx), Subject: kdkID, Details: map[string]string{
			"kdk_version": strconv.Itoa(next), "previous_primary": strconv.Itoa(prev),
		}})
	})
	if err != nil {
		return KDKVersion{}, fmt.Errorf("rotate: %w", err)
	}
	p.log.Warn("KDK rotated; take a backup now: hosts get no keys until the new version is in a backup",
		"kdk_id", out.ID, "kdk_version", out.Version)
	return out, nil
}

// Retire destroys KDK version's key. It fails with ErrInUse while the version is primary
// or any catalog object uses it, and with ErrNotFound for an unknown or retired version.
func (p *Provider) Retire(ctx context.Context, version int) error {
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		if _, err := readMeta(tx); err != nil {
			return err
		}
		var k kdkRecord
		err := getJSON(tx, bucketKDKs, kdkKey(version), &k)
		if errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("KDK version %d: %w; `nkpctl provider status` lists the versions", version, ErrNotFound)
		}
		if err != nil {
			return err
		}
		if k.Retired != nil {
			return fmt.Errorf("KDK version %d was retired already: %w", version, ErrNotFound)
		}
		if k.Primary {
			return fmt.Errorf("KDK version %d (%s) is the primary version: %w; rotate to a new version first", version, k.ID, ErrInUse)
		}
		objs, err := listObjects(tx, "")
		if err != nil {
			return err
		}
		var users []Object
		for _, o := range objs {
			if o.KDKID == k.ID {
				users = append(users, o)
			}
		}
		if len(users) > 0 {
			return fmt.Errorf("KDK version %d (%s) is still used by %d catalog objects, first %s: %w; rekey them to the primary version first",
				version, k.ID, len(users), users[0], ErrInUse)
		}
		now := a.now.UTC()
		k.Retired = &now
		clear(k.Sealed)
		k.Sealed = nil
		if err := putJSON(tx, bucketKDKs, kdkKey(version), k); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindRetire, Actor: actorOf(ctx), Subject: k.ID, Details: map[string]string{
			"kdk_version": strconv.Itoa(version),
		}})
	})
	if err != nil {
		return fmt.Errorf("retire: %w", err)
	}
	return nil
}
