package vm

import (
	"context"
	"errors"
	"fmt"

	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// KDKCache is what CacheKeys uses of hostd/kdkcache.Cache.
type KDKCache interface {
	Primary() (kdkcache.Version, bool)
	Key(version int) ([]byte, string, error)
}

// CacheKeys returns Keys backed by hostd's KDK cache, for the provider providerID.
func CacheKeys(c KDKCache, providerID string) Keys { return cacheKeys{c, providerID} }

type cacheKeys struct {
	c          KDKCache
	providerID string
}

func (k cacheKeys) ProviderID() string { return k.providerID }

func (k cacheKeys) Primary(context.Context) (KDK, error) {
	v, ok := k.c.Primary()
	if !ok {
		return KDK{}, errors.New("the KDK cache has no primary version (has nkp-hostd synced with the provider since it joined?)")
	}
	if v.Err != "" {
		return KDK{}, fmt.Errorf("the primary KDK version %d is unusable: %s", v.Version, v.Err)
	}
	return KDK{ID: v.ID, Version: v.Version}, nil
}

func (k cacheKeys) Derive(_ context.Context, v KDK, purpose, vmUUID, keyID string) ([]byte, error) {
	b, id, err := k.c.Key(v.Version)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	if id != v.ID {
		return nil, fmt.Errorf("KDK version %d of this host has ID %s, not %s (metadata of another provider, or a restored provider with new KDKs)", v.Version, id, v.ID)
	}
	return kdk.Derive(b, purpose, vmUUID, keyID)
}
