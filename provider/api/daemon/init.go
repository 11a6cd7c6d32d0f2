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
// ID and the first KDK (state NotBackedUp), and nkpctl's admin credentials. If it fails
// before the provider is in the store, it removes what it created (see Restore).
func Init(ctx context.Context, cfg InitConfig) (_ provider.Status, err error) {
	u, err := prepareDir(cfg.Dir, cfg.Store, cfg.RootKeyTPM)
	if err != nil {
		return provider.Status{}, err
	}
	defer func() { err = u.finish(err) }()
	key, err := createRootKey(cfg.Dir, cfg.RootKeyTPM)
	if errors.Is(err, rootkey.ErrExists) {
		return provider.Status{}, fmt.Errorf("provider %s: %w (a provider exists there already; use another --dir)", cfg.Dir, err)
	}
	if err != nil {
		return provider.Status{}, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	u.created(filepath.Join(cfg.Dir, RootKeyFile))
	defer key.Wipe()
	return withProvider(ctx, cfg.Dir, cfg.Store, key, cfg.Log, u, func(p *provider.Provider) (provider.Status, error) {
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
//
// A refused restore (wrong passphrase, truncated or altered archive, a store that holds a
// provider) leaves Dir as it found it: the directory, root key and store file it created
// are removed again, so `init` or another restore can follow at once. Files that were
// there before are never touched, and nothing is removed once the store holds a provider
// under the new root key.
func Restore(ctx context.Context, cfg RestoreConfig) (_ provider.Status, err error) {
	u, err := prepareDir(cfg.Dir, cfg.Store, cfg.RootKeyTPM)
	if err != nil {
		return provider.Status{}, err
	}
	defer func() { err = u.finish(err) }()
	key, err := loadRootKey(cfg.Dir, cfg.RootKeyTPM)
	if errors.Is(err, fs.ErrNotExist) {
		if key, err = createRootKey(cfg.Dir, cfg.RootKeyTPM); err == nil {
			u.created(filepath.Join(cfg.Dir, RootKeyFile))
		}
	}
	if err != nil {
		return provider.Status{}, fmt.Errorf("provider %s: %w", cfg.Dir, err)
	}
	defer key.Wipe()
	return withProvider(ctx, cfg.Dir, cfg.Store, key, cfg.Log, u, func(p *provider.Provider) (provider.Status, error) {
		st, err := p.Restore(ctx, cfg.Archive, cfg.Passphrase, cfg.Force)
		if err != nil {
			return st, fmt.Errorf("restore into %s: %w", cfg.Dir, err)
		}
		return st, writeAdmin(ctx, p, cfg.Dir, cfg.AdminName)
	})
}

// undo is what Init or Restore created in a provider directory, removed again (newest
// first) when the attempt fails before the store holds a provider under the new root key.
type undo struct {
	paths []string
	// keep is set once the store holds a provider sealed under the directory's root key
	// (or may: it could not be checked); then nothing is removed.
	keep bool
}

func (u *undo) created(path string) { u.paths = append(u.paths, path) }

// finish removes what was created if err is not nil and nothing must be kept, and says
// so in the error when a removal fails.
func (u *undo) finish(err error) error {
	if err == nil || u.keep {
		return err
	}
	for i := len(u.paths) - 1; i >= 0; i-- {
		if rerr := os.Remove(u.paths[i]); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			return fmt.Errorf("%w (and %s, made by this attempt, could not be removed: %v; remove it by hand)", err, u.paths[i], rerr)
		}
	}
	return err
}

// prepareDir checks what Init and Restore are given before anything is written (the
// directory, the store settings, the root key's TPM) and makes the directory (0700). The
// undo it returns holds the directories it made.
func prepareDir(dir string, sc StoreConfig, rootKeyTPM string) (*undo, error) {
	if dir == "" {
		return nil, errors.New("--dir: the provider directory is required")
	}
	if err := sc.Validate(); err != nil {
		return nil, err
	}
	if rootKeyTPM != "" {
		if _, err := tpmdev.ParseSpec(rootKeyTPM); err != nil {
			return nil, fmt.Errorf("--root-key-tpm: %w", err)
		}
	}
	if err := CheckProviderDir(dir); err != nil {
		return nil, err
	}
	u := &undo{}
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil || filepath.Dir(d) == d {
			break
		}
		missing = append(missing, d)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("provider directory %s: %w", dir, err)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		u.created(missing[i])
	}
	return u, nil
}

// withProvider opens the store and the provider and runs fn. When fn fails, it records
// in u whether the store holds a provider under key now (then u keeps every file); a
// bbolt file it created is recorded in u.
func withProvider(ctx context.Context, dir string, sc StoreConfig, key *rootkey.Key, log *slog.Logger, u *undo,
	fn func(*provider.Provider) (provider.Status, error)) (provider.Status, error) {
	if log == nil {
		return provider.Status{}, errors.New("daemon: no logger")
	}
	if sc.Kind == "" || sc.Kind == StoreBolt {
		path := filepath.Join(dir, StoreFile)
		if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
			defer u.created(path) // recorded after the store is closed below: removed first
		}
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
	out, err := fn(p)
	if err != nil {
		_, serr := p.Status(ctx)
		u.keep = !errors.Is(serr, provider.ErrNotInitialized)
	}
	return out, err
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
	caCert, err := p.CA(ctx)
	if err != nil {
		return fmt.Errorf("admin credentials: %w", err)
	}
	if err := writeCACert(filepath.Join(dir, CACertFile), caCert); err != nil {
		return err
	}
	return writeCredentials(filepath.Join(dir, AdminCertFile), filepath.Join(dir, AdminKeyFile), der, key)
}
