package hostd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/hostd/hosttpm"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/client"
)

// Files in the state directory.
const (
	fileHost   = "host.json"
	fileKey    = "host.key"
	fileCert   = "host.crt"
	fileCA     = "ca.crt"
	dirKDK     = "kdk"
	dirVTPM    = "vtpm"
	dirJournal = "journal"
)

// ErrNotJoined is returned by Start on a host that has not joined a provider.
var ErrNotJoined = errors.New("this host has not joined a provider")

// hostInfo is host.json.
type hostInfo struct {
	ProviderURLs []string  `json:"provider_urls"`
	CAHash       string    `json:"ca_hash"`
	HostID       string    `json:"host_id"`
	Hostname     string    `json:"hostname"`
	ProviderID   string    `json:"provider_id,omitempty"` // learnt from the first release
	TPM          bool      `json:"tpm"`                   // joined with the TPM's EK
	Joined       time.Time `json:"joined"`
	// Revoked is when the provider first refused this host as revoked; the KDK cache
	// was deleted then.
	Revoked *time.Time `json:"revoked,omitempty"`
}

type identity struct {
	info hostInfo
	key  *ecdsa.PrivateKey
	cert tls.Certificate
	ca   *x509.Certificate
}

func loadIdentity(dir string) (*identity, error) {
	raw, err := os.ReadFile(filepath.Join(dir, fileHost))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w (no %s in %s): run `nkp-hostd join --provider URL --ca-hash HASH` first", ErrNotJoined, fileHost, dir)
	}
	if err != nil {
		return nil, err
	}
	var id identity
	if err := json.Unmarshal(raw, &id.info); err != nil {
		return nil, fmt.Errorf("%s: %w: restore it from a backup of this host or join again", filepath.Join(dir, fileHost), err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, fileKey))
	if err != nil {
		return nil, fmt.Errorf("host key: %w", err)
	}
	b, _ := pem.Decode(keyPEM)
	if b == nil {
		return nil, fmt.Errorf("host key %s: not PEM", filepath.Join(dir, fileKey))
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("host key %s: %w", filepath.Join(dir, fileKey), err)
	}
	var ok bool
	if id.key, ok = k.(*ecdsa.PrivateKey); !ok {
		return nil, fmt.Errorf("host key %s: not an ECDSA key", filepath.Join(dir, fileKey))
	}
	leaf, err := readCert(filepath.Join(dir, fileCert))
	if err != nil {
		return nil, err
	}
	id.cert = tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: id.key, Leaf: leaf}
	if id.ca, err = readCert(filepath.Join(dir, fileCA)); err != nil {
		return nil, err
	}
	if id.info.ProviderID == "" {
		id.info.ProviderID = providerIDOf(id.ca)
	}
	return &id, nil
}

func readCert(path string) (*x509.Certificate, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(raw)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: not a PEM certificate", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func (id *identity) saveInfo(dir string) error {
	raw, err := json.MarshalIndent(id.info, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, fileHost), append(raw, '\n'), 0o600)
}

func (id *identity) saveCert(dir string) error {
	return atomicfile.WriteFile(filepath.Join(dir, fileCert), certPEM(id.cert.Leaf.Raw), 0o644)
}

// save writes every identity file; host.json last, so a crash leaves no half-joined host
// that Start would take for joined.
func (id *identity) save(dir string) error {
	der, err := x509.MarshalPKCS8PrivateKey(id.key)
	if err != nil {
		return err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	defer clear(keyPEM)
	defer clear(der)
	if err := atomicfile.WriteFile(filepath.Join(dir, fileKey), keyPEM, 0o600); err != nil {
		return err
	}
	if err := id.saveCert(dir); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, fileCA), certPEM(id.ca.Raw), 0o644); err != nil {
		return err
	}
	return id.saveInfo(dir)
}

// JoinConfig is what `nkp-hostd join` needs.
type JoinConfig struct {
	StateDir  string   // default DefaultStateDir
	Providers []string // provider URLs (replicas of one provider)
	CAHash    string   // "sha256:<hex>" printed with the token
	Token     string   // the single-use join token (from a file, stdin or a prompt)
	Hostname  string   // default os.Hostname
	// TPM / OpenTPM as in Config; TPMNone joins without a TPM.
	TPM     string
	OpenTPM func() (io.ReadWriter, io.Closer, error)
	Log     *slog.Logger
}

// JoinResult says who the host became.
type JoinResult struct {
	HostID   string
	TPM      bool   // the TPM's EK was registered
	CAHash   string // of the pinned CA
	Provider string // the URL that answered
}

// Join enrolls this host with the provider: a new host key (ECDSA P-256, 0600), the host
// certificate through the join token, the host TPM's endorsement key registered so that
// KDKs are released wrapped for it. It refuses a host that has joined already.
func Join(ctx context.Context, cfg JoinConfig) (JoinResult, error) {
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.Providers) == 0 {
		return JoinResult{}, errors.New("join: --provider is required (the provider's URL, or several replicas' URLs separated by commas)")
	}
	if cfg.CAHash == "" {
		return JoinResult{}, errors.New("join: --ca-hash is required (printed by `nkpctl provider token create` with the token)")
	}
	if strings.TrimSpace(cfg.Token) == "" {
		return JoinResult{}, errors.New("join: the token is empty: pass --token-file FILE, --token-stdin, or type it at the prompt")
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, fileHost)); err == nil {
		return JoinResult{}, fmt.Errorf("join: this host has joined already (%s exists): to join again, stop nkp-hostd and move %s away", filepath.Join(cfg.StateDir, fileHost), cfg.StateDir)
	}
	if cfg.Hostname == "" {
		h, err := os.Hostname()
		if err != nil {
			return JoinResult{}, fmt.Errorf("join: host name: %w (pass --hostname)", err)
		}
		cfg.Hostname = h
	}
	if err := makeDirs(cfg.StateDir); err != nil {
		return JoinResult{}, err
	}
	var ek []byte
	if cfg.TPM != TPMNone || cfg.OpenTPM != nil {
		t, err := openHostTPM(cfg.TPM, cfg.OpenTPM)
		if err != nil {
			return JoinResult{}, fmt.Errorf("join: %w (a host without a TPM joins with --tpm none, if the provider's policy allows it)", err)
		}
		ek, err = t.EKPublic()
		t.Close()
		if err != nil {
			return JoinResult{}, fmt.Errorf("join: %w", err)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return JoinResult{}, fmt.Errorf("join: host key: %w", err)
	}
	var enr *client.Enrollment
	var used string
	for i, url := range cfg.Providers {
		enr, err = client.Join(ctx, client.JoinRequest{URL: url, Token: strings.TrimSpace(cfg.Token), CAHash: cfg.CAHash, Hostname: cfg.Hostname, Key: key, EKPublic: ek})
		var ae *client.APIError
		if err == nil || errors.As(err, &ae) || i == len(cfg.Providers)-1 {
			used = url
			break
		}
		cfg.Log.Warn("provider replica unreachable, trying the next", "url", url, "err", err)
	}
	if err != nil {
		return JoinResult{}, err
	}
	id := &identity{
		info: hostInfo{ProviderURLs: cfg.Providers, CAHash: client.CAHash(enr.CA), HostID: enr.HostID, Hostname: cfg.Hostname, TPM: ek != nil, Joined: time.Now().UTC(),
			ProviderID: providerIDOf(enr.CA)},
		key: key, cert: enr.Certificate, ca: enr.CA,
	}
	if err := id.save(cfg.StateDir); err != nil {
		return JoinResult{}, fmt.Errorf("join: the provider enrolled host %s but saving its identity in %s failed: %w; revoke that host ID (nkpctl provider revoke HOST-ID) and join again", enr.HostID, cfg.StateDir, err)
	}
	cfg.Log.Info("host joined", "host_id", enr.HostID, "provider", used, "tpm", ek != nil)
	return JoinResult{HostID: enr.HostID, TPM: ek != nil, CAHash: id.info.CAHash, Provider: used}, nil
}

// makeDirs creates the state directory layout: the directory and vtpm/ 0711 (the vTPM
// user traverses them), kdk/ and journal/ 0700.
func makeDirs(stateDir string) error {
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{stateDir, 0o711}, {filepath.Join(stateDir, dirVTPM), 0o711}, {filepath.Join(stateDir, dirKDK), 0o700}, {filepath.Join(stateDir, dirJournal), 0o700}} {
		err := os.MkdirAll(d.path, d.mode)
		if err == nil {
			err = os.Chmod(d.path, d.mode)
		}
		if err != nil {
			return fmt.Errorf("state directory %s: %w: nkp-hostd keeps its identity, KDK cache, vTPM state and journal there and needs it writable (a file system mounted read-write, with free space; or another --state-dir)", stateDir, err)
		}
	}
	return nil
}

// openHostTPM opens the host TPM and loads its EK.
func openHostTPM(spec string, open func() (io.ReadWriter, io.Closer, error)) (*hosttpm.TPM, error) {
	if open != nil {
		rw, c, err := open()
		if err != nil {
			return nil, err
		}
		t, err := hosttpm.New(rw, c)
		if err != nil && c != nil {
			c.Close()
		}
		return t, err
	}
	rw, c, err := openTPMSpec(spec)
	if err != nil {
		return nil, fmt.Errorf("host TPM: %w", err)
	}
	t, err := hosttpm.New(rw, c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return t, nil
}
