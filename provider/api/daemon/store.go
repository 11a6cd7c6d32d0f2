package daemon

import (
	"context"
	"errors"
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
	// EtcdCACert, EtcdCert and EtcdKey are PEM files for TLS to etcd (etcdstore.LoadTLS):
	// the CA that signed etcd's server certificate, and the client certificate and its key
	// (0600) when etcd enforces client certificates (--client-cert-auth). https:// endpoints
	// need EtcdCACert.
	EtcdCACert, EtcdCert, EtcdKey string
}

// Validate names the bad flag.
func (c *StoreConfig) Validate() error {
	switch c.Kind {
	case "", StoreBolt:
		if len(c.EtcdEndpoints) > 0 {
			return fmt.Errorf("--etcd-endpoints given with --store %s: use --store etcd", StoreBolt)
		}
		if c.EtcdCACert != "" || c.EtcdCert != "" || c.EtcdKey != "" {
			return fmt.Errorf("--etcd-cacert/--etcd-cert/--etcd-key given with --store %s: use --store etcd", StoreBolt)
		}
	case StoreEtcd:
		if len(c.EtcdEndpoints) == 0 {
			return fmt.Errorf("--store etcd needs --etcd-endpoints (comma-separated http(s)://host:port)")
		}
		tls := c.EtcdCACert != "" || c.EtcdCert != "" || c.EtcdKey != ""
		for _, ep := range c.EtcdEndpoints {
			https := strings.HasPrefix(ep, "https://")
			switch {
			case https && c.EtcdCACert == "":
				return fmt.Errorf("--etcd-endpoints %s uses https: give --etcd-cacert FILE (the CA of etcd's server certificate), and --etcd-cert/--etcd-key when etcd requires client certificates", ep)
			case !https && tls:
				return fmt.Errorf("--etcd-cacert/--etcd-cert/--etcd-key given but --etcd-endpoints %s is not https://: use etcd's https client URLs", ep)
			}
		}
		if (c.EtcdCert == "") != (c.EtcdKey == "") {
			return errors.New("--etcd-cert and --etcd-key go together: give both (the client certificate and its 0600 key) or neither")
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
		ecfg := etcdstore.Config{Endpoints: cfg.EtcdEndpoints, Prefix: cfg.EtcdPrefix, Log: log}
		if cfg.EtcdCACert != "" {
			t, err := etcdstore.LoadTLS(cfg.EtcdCACert, cfg.EtcdCert, cfg.EtcdKey)
			if err != nil {
				return nil, fmt.Errorf("etcd TLS (--etcd-cacert/--etcd-cert/--etcd-key): %w", err)
			}
			ecfg.TLS = t
		}
		s, err := etcdstore.Open(ctx, ecfg)
		if err != nil {
			hint := "is etcd running and reachable?"
			switch {
			case ecfg.TLS != nil && cfg.EtcdCert == "":
				hint = "is etcd running and reachable? if etcd requires client certificates (--client-cert-auth), give --etcd-cert and --etcd-key"
			case ecfg.TLS != nil:
				hint = "is etcd running and reachable, and do --etcd-cacert, --etcd-cert and --etcd-key match its TLS setup?"
			}
			return nil, fmt.Errorf("etcd store at %s: %w (%s)", strings.Join(cfg.EtcdEndpoints, ","), err, hint)
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
