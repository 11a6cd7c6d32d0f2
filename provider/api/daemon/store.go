package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/provider/store/etcdstore"
)

// Store kinds.
const (
	StoreBolt = "bolt"
	StoreEtcd = "etcd"
)

// StoreConfig selects the store: a bbolt file in the provider directory (default), or an
// etcd cluster shared by several replicas.
type StoreConfig struct {
	// Kind is StoreBolt (or "") or StoreEtcd.
	Kind string
	// EtcdEndpoints are the etcd client URLs (StoreEtcd only).
	EtcdEndpoints []string
	// EtcdPrefix namespaces the provider's keys in etcd (default etcdstore.DefaultPrefix,
	// "/nkp/provider/"); replicas of one provider use the same prefix.
	EtcdPrefix string
}

// Validate names the bad flag.
func (c *StoreConfig) Validate() error {
	switch c.Kind {
	case "", StoreBolt:
		if len(c.EtcdEndpoints) > 0 {
			return fmt.Errorf("--etcd-endpoints given with --store %s: use --store etcd", StoreBolt)
		}
	case StoreEtcd:
		if len(c.EtcdEndpoints) == 0 {
			return fmt.Errorf("--store etcd needs --etcd-endpoints (comma-separated http(s)://host:port)")
		}
	default:
		return fmt.Errorf("--store %q: want %s or %s", c.Kind, StoreBolt, StoreEtcd)
	}
	return nil
}

// OpenStore opens the store cfg describes for the provider directory dir.
func OpenStore(ctx context.Context, dir string, cfg StoreConfig, log *slog.Logger) (store.Store, error) {
	switch cfg.Kind {
	case StoreEtcd:
		s, err := etcdstore.Open(ctx, etcdstore.Config{Endpoints: cfg.EtcdEndpoints, Prefix: cfg.EtcdPrefix, Log: log})
		if err != nil {
			return nil, fmt.Errorf("etcd store at %s: %w (is etcd running and reachable?)", strings.Join(cfg.EtcdEndpoints, ","), err)
		}
		return s, nil
	default:
		path := filepath.Join(dir, StoreFile)
		s, err := boltstore.Open(path, boltstore.Options{})
		if err != nil {
			return nil, fmt.Errorf("bolt store %s: %w", path, err)
		}
		return s, nil
	}
}
