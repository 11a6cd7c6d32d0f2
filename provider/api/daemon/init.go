package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nkp-dev/nkp/internal/tpmdev"
	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/rootkey"
)

// InitConfig configures Init.
type InitConfig struct {
	Dir         string
	Store       StoreConfig
	TPMRequired bool
	// RootKeyTPM seals the root key to the provider host's TPM (tpmdev.Open: a device
	// such as /dev/tpmrm0, or swtpm:path=SOCKET[,ctrl=SOCKET]); empty writes a plain 0600 key file.
	RootKeyTPM string
	// AdminName is the CN of the admin certificate written into Dir (default "admin").
	AdminName string
	Log       *slog.Logger
}

// Init creates a provider in a new directory: the root key (0600), the store, the provider
// ID and the first KDK (state NotBackedUp), and nkpctl's admin credentials.
func Init(ctx context.Context, cfg InitConfig) (provider.Status, error) {
	if err := prepareDir(cfg.Dir, cfg.Store, cfg.RootKeyTPM); err != nil {
		return provider.Status{}, err
	}
	key, err := createRootKey(cfg.Dir, cfg.RootKeyTPM)
	if errors.Is(err, rootkey.ErrExists) {
		return provider.Status{}, fmt.Errorf("provider %s: %w (a provider exists there already; use another --dir)", cfg.Dir, err)
	}
	if err != nil {
		return provider.Status{}, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	defer key.Wipe()
	return withProvider(ctx, cfg.Dir, cfg.Store, key, cfg.Log, func(p *provider.Provider) (provider.Status, error) {
		st, err := p.Init(ctx, provider.InitOptions{Policy: provider.Policy{TPMRequired: cfg.TPMRequired}})
		if err != nil {
			return st, fmt.Errorf("provider %s: %w", cfg.Dir, err)
		}
		return st, writeAdmin(ctx, p, cfg.Dir, cfg.AdminName)
	})
}

// RestoreConfig configures Restore.
type RestoreConfig struct {
	Dir        string
	Store      StoreConfig
	Archive    io.Reader
	Passphrase []byte
	// Force restores over a provider that is not empty.
	Force bool
	// RootKeyTPM is InitConfig.RootKeyTPM: the TPM the directory's root key is sealed to,
	// or, without a root key yet, the TPM to seal a new one to.
	RootKeyTPM string
	AdminName  string
	Log        *slog.Logger
}

// Restore rebuilds a provider from a backup archive into Dir: it creates the root key if
// there is none, restores the store (refused over a non-empty provider unless Force), and
// writes fresh admin credentials from the restored CA.
func Restore(ctx context.Context, cfg RestoreConfig) (provider.Status, error) {
	if err := prepareDir(cfg.Dir, cfg.Store, cfg.RootKeyTPM); err != nil {
		return provider.Status{}, err
	}
	key, err := loadRootKey(cfg.Dir, cfg.RootKeyTPM)
	if errors.Is(err, fs.ErrNotExist) {
		key, err = createRootKey(cfg.Dir, cfg.RootKeyTPM)
	}
	if err != nil {
		return provider.Status{}, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	defer key.Wipe()
	return withProvider(ctx, cfg.Dir, cfg.Store, key, cfg.Log, func(p *provider.Provider) (provider.Status, error) {
		st, err := p.Restore(ctx, cfg.Archive, cfg.Passphrase, cfg.Force)
		if err != nil {
			return st, fmt.Errorf("restore into %s: %w", cfg.Dir, err)
		}
		return st, writeAdmin(ctx, p, cfg.Dir, cfg.AdminName)
	})
}

// prepareDir checks what Init and Restore are given before anything is written (the
// directory, the store settings, the root key's TPM) and makes the directory (0700).
func prepareDir(dir string, sc StoreConfig, rootKeyTPM string) error {
	if dir == "" {
		return errors.New("--dir: the provider directory is required")
	}
	if err := sc.Validate(); err != nil {
		return err
	}
	if rootKeyTPM != "" {
		if _, err := tpmdev.ParseSpec(rootKeyTPM); err != nil {
			return fmt.Errorf("--root-key-tpm: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("provider directory %s: %w", dir, err)
	}
	return nil
}

func withProvider(ctx context.Context, dir string, sc StoreConfig, key *rootkey.Key, log *slog.Logger,
	fn func(*provider.Provider) (provider.Status, error)) (provider.Status, error) {
	if log == nil {
		return provider.Status{}, errors.New("daemon: no logger")
	}
	st, err := OpenStore(ctx, dir, sc, log)
	if err != nil {
		return provider.Status{}, err
	}
	defer st.Close()
	p, err := provider.Open(ctx, provider.Config{Store: st, RootKey: key, Log: log, Now: time.Now})
	if err != nil {
		return provider.Status{}, fmt.Errorf("provider %s: %w", dir, err)
	}
	return fn(p)
}

// writeAdmin issues an admin certificate for a new key and writes ca.crt, admin.crt and
// admin.key into dir.
func writeAdmin(ctx context.Context, p *provider.Provider, dir, name string) error {
	if name == "" {
		name = "admin"
	}
	key, csr, err := newKeyAndCSR(name)
	if err != nil {
		return fmt.Errorf("admin credentials: %w", err)
	}
	der, err := p.IssueAdminCert(ctx, csr)
	if err != nil {
		return fmt.Errorf("admin credentials: %w", err)
	}
	if err := writeCACert(filepath.Join(dir, CACertFile), p.CA()); err != nil {
		return err
	}
	return writeCredentials(filepath.Join(dir, AdminCertFile), filepath.Join(dir, AdminKeyFile), der, key)
}
