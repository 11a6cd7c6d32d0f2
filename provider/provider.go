package provider

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/backup"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store"
)

// Defaults for the optional Config fields.
const (
	DefaultCAValidity         = 20 * 365 * 24 * time.Hour
	DefaultHostCertValidity   = 5 * 365 * 24 * time.Hour
	DefaultAdminCertValidity  = 2 * 365 * 24 * time.Hour
	DefaultServerCertValidity = 365 * 24 * time.Hour
	DefaultTokenTTL           = time.Hour
	MaxTokenTTL               = 7 * 24 * time.Hour
	// KDKSize is the length of a KDK in bytes.
	KDKSize = 32
)

// Config configures Open. Store, RootKey and Log are required.
type Config struct {
	Store   store.Store
	RootKey *rootkey.Key
	Log     *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Validity of issued certificates; zero means the Default… constants.
	HostCertValidity   time.Duration
	AdminCertValidity  time.Duration
	ServerCertValidity time.Duration

	// writeArchive encrypts backup archives; nil means backup.Write (age's default scrypt
	// cost). Only this package's tests set it (export_test.go), to a cheaper cost.
	writeArchive func(w io.Writer, passphrase []byte, d *backup.Document) (int64, error)
}

// Validate names the first missing or bad field.
func (c *Config) Validate() error {
	switch {
	case c.Store == nil:
		return errors.New("provider config: Store is nil")
	case c.RootKey == nil:
		return errors.New("provider config: RootKey is nil")
	case c.Log == nil:
		return errors.New("provider config: Log is nil")
	case c.HostCertValidity < 0 || c.AdminCertValidity < 0 || c.ServerCertValidity < 0:
		return errors.New("provider config: a certificate validity is negative")
	}
	return nil
}

// Provider is the key provider. Its methods are safe for concurrent use; several
// Providers (replicas) may share one store.
type Provider struct {
	st  store.Store
	rk  *rootkey.Key
	log *slog.Logger
	now func() time.Time
	cfg Config

	rel batcher // groups concurrent releases into one transaction

	verifiedMu sync.Mutex
	verified   map[[32]byte]verifiedCert // by SHA-256 of the certificate; guarded by verifiedMu

	caMu sync.Mutex
	// Guarded by caMu.
	ca   *ca.CA
	caID string // provider ID the cached CA belongs to
}

// Open opens the provider kept in cfg.Store. The store may be empty (then Init or Restore
// it); if it holds a provider, cfg.RootKey must be that provider's root key, else Open
// fails with ErrRootKeyMismatch.
func Open(ctx context.Context, cfg Config) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HostCertValidity == 0 {
		cfg.HostCertValidity = DefaultHostCertValidity
	}
	if cfg.AdminCertValidity == 0 {
		cfg.AdminCertValidity = DefaultAdminCertValidity
	}
	if cfg.ServerCertValidity == 0 {
		cfg.ServerCertValidity = DefaultServerCertValidity
	}
	if cfg.writeArchive == nil {
		cfg.writeArchive = backup.Write
	}
	p := &Provider{st: cfg.Store, rk: cfg.RootKey, log: cfg.Log, now: cfg.Now, cfg: cfg,
		verified: map[[32]byte]verifiedCert{}}
	err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		if errors.Is(err, ErrNotInitialized) {
			return nil
		}
		if err != nil {
			return err
		}
		return p.checkRoot(m)
	})
	if err != nil {
		return nil, fmt.Errorf("opening provider: %w", err)
	}
	return p, nil
}

const rootCheckPlain = "nkp provider root key check"

func rootCheckAD(providerID string) []byte { return []byte("nkp/v1/root-check/" + providerID) }
func caAD(providerID string) []byte        { return []byte("nkp/v1/ca/" + providerID) }
func kdkAD(providerID, kdkID string) []byte {
	return []byte("nkp/v1/kdk/" + providerID + "/" + kdkID)
}

func (p *Provider) checkRoot(m metaRecord) error {
	pt, err := p.rk.Open(m.RootCheck, rootCheckAD(m.ID))
	if err != nil || string(pt) != rootCheckPlain {
		return fmt.Errorf("%w: the store belongs to provider %s, and root key %s (%s) is not its root key; "+
			"start with that provider's root key file, or restore a backup into an empty store",
			ErrRootKeyMismatch, m.ID, p.rk.Fingerprint(), p.rk.Path())
	}
	return nil
}

// actorKey carries the acting administrator's name in a context.
type actorKey struct{}

// WithActor returns a context that names who acts (e.g. "admin:alice", from the admin
// certificate's CN); the audit log records it. Without it, admin actions are recorded
// with actor "admin".
func WithActor(ctx context.Context, actor string) context.Context {
	return context.WithValue(ctx, actorKey{}, actor)
}

func actorOf(ctx context.Context) string {
	if a, ok := ctx.Value(actorKey{}).(string); ok && a != "" {
		return a
	}
	return "admin"
}

// auditor collects the audit records appended in one transaction attempt.
type auditor struct {
	now  time.Time
	recs []audit.Record
}

func (a *auditor) add(tx store.Tx, ev audit.Event) error {
	ev.Time = a.now
	rec, err := audit.Append(tx, ev)
	if err != nil {
		return fmt.Errorf("audit %s: %w", ev.Kind, err)
	}
	a.recs = append(a.recs, rec)
	return nil
}

// update runs fn in a store transaction with an auditor; once it committed, the audit
// records go to the structured log too.
func (p *Provider) update(ctx context.Context, fn func(tx store.Tx, a *auditor) error) error {
	var a *auditor
	err := p.st.Update(ctx, func(tx store.Tx) error {
		a = &auditor{now: p.now()} // fresh per attempt: Update may run fn again
		return fn(tx, a)
	})
	if err != nil {
		return err
	}
	for _, r := range a.recs {
		audit.Log(ctx, p.log, r)
	}
	return nil
}

func newKDK() ([]byte, error) {
	k := make([]byte, KDKSize)
	if _, err := io.ReadFull(rand.Reader, k); err != nil {
		return nil, fmt.Errorf("generating KDK: %w", err)
	}
	return k, nil
}

// sealKDK encrypts a fresh or restored KDK under the root key.
func (p *Provider) sealKDK(providerID, kdkID string, key []byte) ([]byte, error) {
	s, err := p.rk.Seal(key, kdkAD(providerID, kdkID))
	if err != nil {
		return nil, fmt.Errorf("sealing KDK %s: %w", kdkID, err)
	}
	return s, nil
}

// openKDK decrypts a KDK record's key; the caller wipes it.
func (p *Provider) openKDK(providerID string, k kdkRecord) ([]byte, error) {
	if k.Retired != nil || len(k.Sealed) == 0 {
		return nil, fmt.Errorf("KDK %s (version %d) is retired; its key was destroyed: %w", k.ID, k.Version, ErrNotFound)
	}
	key, err := p.rk.Open(k.Sealed, kdkAD(providerID, k.ID))
	if err != nil {
		return nil, fmt.Errorf("KDK %s (version %d): %w: %w; the store was altered or belongs to another root key, restore from a backup",
			k.ID, k.Version, ErrRootKeyMismatch, err)
	}
	if len(key) != KDKSize {
		clear(key)
		return nil, fmt.Errorf("KDK %s (version %d): %d bytes, want %d; restore from a backup", k.ID, k.Version, len(key), KDKSize)
	}
	return key, nil
}

// Init creates the provider: its ID, CA and the first KDK (version 1, primary), in state
// NotBackedUp. It fails with ErrNotEmpty if the store holds a provider already.
func (p *Provider) Init(ctx context.Context, opts InitOptions) (Status, error) {
	id := uuid.NewString()
	now := p.now().UTC()
	authority, err := ca.New(id, now, DefaultCAValidity)
	if err != nil {
		return Status{}, fmt.Errorf("init: %w", err)
	}
	caKey, err := authority.MarshalKey()
	if err != nil {
		return Status{}, fmt.Errorf("init: %w", err)
	}
	defer clear(caKey)
	sealedCA, err := p.rk.Seal(caKey, caAD(id))
	if err != nil {
		return Status{}, fmt.Errorf("init: sealing the CA key: %w", err)
	}
	check, err := p.rk.Seal([]byte(rootCheckPlain), rootCheckAD(id))
	if err != nil {
		return Status{}, fmt.Errorf("init: %w", err)
	}
	kdk, err := newKDK()
	if err != nil {
		return Status{}, fmt.Errorf("init: %w", err)
	}
	defer clear(kdk)
	kdkID := uuid.NewString()
	sealed, err := p.sealKDK(id, kdkID, kdk)
	if err != nil {
		return Status{}, fmt.Errorf("init: %w", err)
	}
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		if m, err := readMeta(tx); err == nil {
			return fmt.Errorf("%w: the store already holds provider %s; use it, or init in another directory", ErrNotEmpty, m.ID)
		} else if !errors.Is(err, ErrNotInitialized) {
			return err
		}
		meta := metaRecord{ID: id, Created: now, Policy: opts.Policy, RootCheck: check}
		if err := putJSON(tx, bucketProvider, keyMeta, meta); err != nil {
			return err
		}
		if err := putJSON(tx, bucketProvider, keyCA, caRecord{Cert: authority.Certificate().Raw, SealedKey: sealedCA}); err != nil {
			return err
		}
		rec := kdkRecord{ID: kdkID, Version: 1, Created: now, Primary: true, Sealed: sealed}
		if err := putJSON(tx, bucketKDKs, kdkKey(1), rec); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindInit, Actor: actorOf(ctx), Subject: id, Details: map[string]string{
			"kdk_id": kdkID, "kdk_version": "1", "tpm_required": fmt.Sprint(opts.Policy.TPMRequired), "ca_hash": authority.Hash(),
		}})
	})
	if err != nil {
		return Status{}, fmt.Errorf("init: %w", err)
	}
	p.setCA(authority, id)
	p.log.Info("provider initialized; take a backup before hosts can fetch keys", "provider_id", id, "kdk_id", kdkID, "ca_hash", authority.Hash())
	return p.Status(ctx)
}

// Status reports the provider's state.
func (p *Provider) Status(ctx context.Context) (Status, error) {
	var st Status
	err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		hosts, err := listHosts(tx)
		if err != nil {
			return err
		}
		st = Status{State: stateOf(kdks), ProviderID: m.ID, Created: m.Created, Policy: m.Policy}
		if st.PendingBackups, err = p.pendingBackups(tx); err != nil {
			return err
		}
		if m.LastBackup != nil {
			st.LastBackup = *m.LastBackup
		}
		for _, k := range kdks {
			st.KDKs = append(st.KDKs, k.public())
		}
		for _, h := range hosts {
			if h.Revoked != nil {
				st.Revoked++
			} else {
				st.Hosts++
			}
		}
		return nil
	})
	if err != nil {
		return Status{}, fmt.Errorf("status: %w", err)
	}
	return st, nil
}

// Policy returns the provider's policy.
func (p *Provider) Policy(ctx context.Context) (Policy, error) {
	var pol Policy
	err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		pol = m.Policy
		return err
	})
	if err != nil {
		return Policy{}, fmt.Errorf("policy: %w", err)
	}
	return pol, nil
}

// SetPolicy replaces the provider's policy. Turning tpm-required on does not revoke hosts
// without a TPM, but from then on their releases are refused.
func (p *Provider) SetPolicy(ctx context.Context, pol Policy) error {
	nonTPM := 0
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		hosts, err := listHosts(tx)
		if err != nil {
			return err
		}
		nonTPM = 0
		for _, h := range hosts {
			if h.Revoked == nil && len(h.EKPublic) == 0 {
				nonTPM++
			}
		}
		m.Policy = pol
		if err := putJSON(tx, bucketProvider, keyMeta, m); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindPolicy, Actor: actorOf(ctx), Subject: m.ID, Details: map[string]string{
			"tpm_required": fmt.Sprint(pol.TPMRequired), "hosts_without_tpm": fmt.Sprint(nonTPM),
		}})
	})
	if err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	if pol.TPMRequired && nonTPM > 0 {
		p.log.Warn("policy tpm-required is on: hosts without a TPM will be refused their keys; revoke or re-enroll them with a TPM",
			"hosts_without_tpm", nonTPM)
	}
	return nil
}

// CA returns the CA certificate of the provider the store holds now (hosts and admins
// chain to it). It reads the store, so it takes a context and fails with the store's
// error, or with ErrNotInitialized when the store holds no provider; it never returns a
// nil certificate without an error.
func (p *Provider) CA(ctx context.Context) (*x509.Certificate, error) {
	c, err := p.currentCA(ctx)
	if err != nil {
		return nil, err
	}
	return c.Certificate(), nil
}

// CAHash is the pin hosts check at join: "sha256:<hex of the CA's SubjectPublicKeyInfo>".
// It fails as CA does.
func (p *Provider) CAHash(ctx context.Context) (string, error) {
	c, err := p.currentCA(ctx)
	if err != nil {
		return "", err
	}
	return c.Hash(), nil
}

func (p *Provider) setCA(c *ca.CA, providerID string) {
	p.caMu.Lock()
	defer p.caMu.Unlock()
	p.ca, p.caID = c, providerID
}

// currentCA returns the CA of the provider the store holds now.
func (p *Provider) currentCA(ctx context.Context) (*ca.CA, error) {
	var id string
	err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		id = m.ID
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("loading the provider CA: %w", err)
	}
	return p.loadCA(ctx, id)
}

// loadCA returns the CA of provider providerID ("" = whichever the store holds), from
// the cache when it belongs to that provider, else from the store: a forced restore by
// another replica changes the provider ID, and this replica follows.
func (p *Provider) loadCA(ctx context.Context, providerID string) (*ca.CA, error) {
	p.caMu.Lock()
	defer p.caMu.Unlock()
	if p.ca != nil && (providerID == "" || providerID == p.caID) {
		return p.ca, nil
	}
	var c *ca.CA
	var id string
	err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		var rec caRecord
		if err := getJSON(tx, bucketProvider, keyCA, &rec); err != nil {
			return fmt.Errorf("reading the CA: %w", err)
		}
		key, err := p.rk.Open(rec.SealedKey, caAD(m.ID))
		if err != nil {
			return fmt.Errorf("CA key of provider %s: %w: %w", m.ID, ErrRootKeyMismatch, err)
		}
		defer clear(key)
		c, err = ca.Parse(rec.Cert, key)
		id = m.ID
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("loading the provider CA: %w", err)
	}
	p.ca, p.caID = c, id
	return c, nil
}

// AuditVerify checks the audit chain; a broken chain gives an error wrapping
// audit.ErrTampered that names the first bad record.
func (p *Provider) AuditVerify(ctx context.Context) error {
	err := p.st.View(ctx, func(tx store.Tx) error { return audit.Verify(tx) })
	if err != nil {
		return fmt.Errorf("audit verify: %w", err)
	}
	return nil
}

// Audit returns the last n audit records, oldest first.
func (p *Provider) Audit(ctx context.Context, n int) ([]audit.Record, error) {
	var recs []audit.Record
	err := p.st.View(ctx, func(tx store.Tx) error {
		var err error
		recs, err = audit.Tail(tx, n)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return recs, nil
}
