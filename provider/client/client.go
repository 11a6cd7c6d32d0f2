// Package client is the Go client of nkp-provider's HTTPS API, whose wire contract is
// package provider/apiv1: nkpctl uses it with the admin certificate, nkp-hostd with its host certificate, and the
// tests and the benchmark with either. Join enrolls a new host, trusting the provider only
// through the CA hash the operator passes (no certificate is needed beforehand).
//
// A Client reuses its connections (HTTP/1.1 keep-alive over TLS 1.3); it is safe for
// concurrent use. Error responses become *APIError, whose Code is one of apiv1's Code
// constants.
//
// Who may import it: nkpctl (provider/cli), hostd, tests and benchmarks. It imports only the
// standard library and provider/apiv1, never the provider's server, domain or stores, so a
// host links none of them.
//
// Identity: no host-name check; the server's chain to the pinned CA, with
// ExtKeyUsageServerAuth, is its identity. With Config.Replicas, a request that fails
// at the connection level goes to the next URL (the last one that answered is tried
// first); an *APIError refusal is final. A POST may therefore reach two replicas:
// host writes are kept idempotent. Backup checks the received archive against the
// Nkp-Archive-Sha256 header before ConfirmBackup is sent.
package client

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
)

// Config says where the provider is and how to authenticate to it.
type Config struct {
	// URL is the provider's base URL, e.g. https://provider.example:8443.
	URL string
	// Replicas are more base URLs of the same provider (replicas sharing one etcd). A
	// request that fails to reach one (connection refused or cut, TLS failure, timeout) is
	// sent to the next; the one that answered is tried first next time. A refusal from a
	// provider (*APIError) is final.
	Replicas []string
	// CA is the provider CA that the server's certificate must chain to.
	CA *x509.Certificate
	// Certificate is the client certificate (host or admin) with its private key.
	Certificate tls.Certificate
	// Timeout bounds each request; 0 means 30 s.
	Timeout time.Duration
	// MaxConnsPerHost bounds connections to the provider (0: no bound).
	MaxConnsPerHost int
}

// Client talks to one provider. It is safe for concurrent use.
type Client struct {
	ca      *x509.Certificate // the pinned provider CA (nil for Join's client)
	bases   []*url.URL
	current atomic.Int32 // index in bases of the replica that answered last
	timeout time.Duration
	maxConn int

	tcMu sync.Mutex
	tc   *tls.Config // guarded by tcMu; Renew replaces its certificate

	hc atomic.Pointer[http.Client] // replaced whole when Renew changes the certificate
}

// APIError is an error response from the provider.
type APIError struct {
	Status  int    // HTTP status
	Code    string // one of apiv1's Code constants
	Message string // the provider's sentence
}

func (e *APIError) Error() string {
	return fmt.Sprintf("provider: %s (HTTP %d, code %s)", e.Message, e.Status, e.Code)
}

// IsCode reports whether err is (or wraps) an *APIError with the given code.
func IsCode(err error, code string) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == code
}

// New returns a Client for cfg.
func New(cfg Config) (*Client, error) {
	if cfg.CA == nil {
		return nil, errors.New("provider client: no CA certificate: pass the provider's ca.crt")
	}
	if len(cfg.Certificate.Certificate) == 0 {
		return nil, errors.New("provider client: no client certificate: enroll the host first or use the admin certificate from the provider directory")
	}
	tc := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{cfg.Certificate},
		InsecureSkipVerify: true, // replaced by VerifyConnection: chain to the pinned CA, no host name check
		VerifyConnection:   verifyAgainst(cfg.CA),
	}
	c, err := newClient(append([]string{cfg.URL}, cfg.Replicas...), tc, cfg.Timeout, cfg.MaxConnsPerHost)
	if err != nil {
		return nil, err
	}
	c.ca = cfg.CA
	return c, nil
}

func newClient(rawURLs []string, tc *tls.Config, timeout time.Duration, maxConns int) (*Client, error) {
	var bases []*url.URL
	for _, raw := range rawURLs {
		u, err := url.Parse(raw)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("provider client: URL %q: want https://HOST:PORT", raw)
		}
		bases = append(bases, u)
	}
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	c := &Client{bases: bases, timeout: timeout, maxConn: maxConns, tc: tc}
	c.hc.Store(c.httpClient(tc))
	return c, nil
}

// httpClient is an HTTP client over tc with its own connection pool.
func (c *Client) httpClient(tc *tls.Config) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:     tc,
		ForceAttemptHTTP2:   false,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		MaxConnsPerHost:     c.maxConn,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
	}
	return &http.Client{Transport: tr, Timeout: c.timeout}
}

// CAHash is the pin of a CA certificate: "sha256:" and the hex SHA-256 of its
// SubjectPublicKeyInfo.
func CAHash(ca *x509.Certificate) string {
	sum := sha256.Sum256(ca.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// verifyAgainst checks that the server's leaf chains to ca (through the intermediates it
// sent) and is valid for server authentication. The host name is not checked: the
// provider CA is private to one provider and issues server certificates only to its
// replicas, so the chain is the identity.
func verifyAgainst(ca *x509.Certificate) func(tls.ConnectionState) error {
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("provider presented no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
			Roots:         roots,
			Intermediates: inter,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		})
		if err != nil {
			return fmt.Errorf("provider certificate does not chain to the trusted provider CA %s: %w", CAHash(ca), err)
		}
		return nil
	}
}

// Close drops idle connections.
func (c *Client) Close() { c.hc.Load().CloseIdleConnections() }

// do sends one request; in (if not nil) is marshalled as JSON, out (if not nil) receives
// the JSON response. A non-2xx status becomes *APIError.
func (c *Client) do(ctx context.Context, method, path string, query url.Values, in, out any) error {
	resp, err := c.send(ctx, method, path, query, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return nil
	}
	dec := json.NewDecoder(io.LimitReader(resp.Body, apiv1.MaxArchiveBodyBytes))
	if err := dec.Decode(out); err != nil {
		return fmt.Errorf("provider %s %s: decoding response: %w", method, path, err)
	}
	return nil
}

func (c *Client) send(ctx context.Context, method, path string, query url.Values, in any) (*http.Response, error) {
	var raw []byte
	if in != nil {
		var err error
		raw, err = json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("provider %s %s: encoding request: %w", method, path, err)
		}
		defer clear(raw) // may hold a passphrase
	}
	start := int(c.current.Load())
	var errs []error
	for i := range c.bases {
		n := (start + i) % len(c.bases)
		resp, err := c.sendTo(ctx, c.bases[n], method, path, query, raw)
		var ae *APIError
		if err == nil || errors.As(err, &ae) || ctx.Err() != nil {
			if err == nil || ae != nil {
				c.current.Store(int32(n))
			}
			return resp, err
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

func (c *Client) sendTo(ctx context.Context, base *url.URL, method, path string, query url.Values, raw []byte) (*http.Response, error) {
	u := *base
	u.Path = strings.TrimSuffix(u.Path, "/") + path
	u.RawQuery = query.Encode()
	var body io.Reader
	if raw != nil {
		body = bytes.NewReader(raw)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, fmt.Errorf("provider %s %s: %w", method, path, err)
	}
	if raw != nil {
		req.Header.Set("Content-Type", apiv1.ContentTypeJSON)
	}
	resp, err := c.hc.Load().Do(req)
	if err != nil {
		return nil, fmt.Errorf("provider %s %s: %w (is nkp-provider running at %s?)", method, path, err, base.Host)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, decodeError(resp)
	}
	return resp, nil
}

func decodeError(resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var eb apiv1.ErrorBody
	if err := json.Unmarshal(data, &eb); err != nil || eb.Code == "" {
		return &APIError{Status: resp.StatusCode, Code: apiv1.CodeInternal,
			Message: fmt.Sprintf("unexpected response %q", truncate(string(data), 200))}
	}
	return &APIError{Status: resp.StatusCode, Code: eb.Code, Message: eb.Error}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Healthz reports whether the provider process answers.
func (c *Client) Healthz(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, apiv1.PathHealthz, nil, nil, nil)
}

// Readyz reports whether the provider can serve (store reachable, initialised).
func (c *Client) Readyz(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, apiv1.PathReadyz, nil, nil, nil)
}

// Release fetches every KDK version in use for the calling host.
func (c *Client) Release(ctx context.Context) (apiv1.ReleaseResponse, error) {
	var r apiv1.ReleaseResponse
	err := c.do(ctx, http.MethodGet, apiv1.PathHostKDKs, nil, nil, &r)
	return r, err
}

// ReleaseChanged is Release for a host that holds the KDKs of key set known (the KeySet
// of its last release): while that set is current the provider answers Unchanged with no
// KDKs (and audits nothing); else it releases the keys as Release does. A polling host
// uses it; an empty known is Release.
func (c *Client) ReleaseChanged(ctx context.Context, known string) (apiv1.ReleaseResponse, error) {
	var r apiv1.ReleaseResponse
	var q url.Values
	if known != "" {
		q = url.Values{"known": {known}}
	}
	err := c.do(ctx, http.MethodGet, apiv1.PathHostKDKs, q, nil, &r)
	return r, err
}

// RegisterObject records a protected object in the provider's catalog.
func (c *Client) RegisterObject(ctx context.Context, o apiv1.Object) error {
	return c.do(ctx, http.MethodPost, apiv1.PathHostObjects, nil, o, nil)
}

// UnregisterObject removes a protected object from the provider's catalog.
func (c *Client) UnregisterObject(ctx context.Context, vmUUID, name string) error {
	return c.do(ctx, http.MethodDelete, apiv1.PathHostObjects+"/"+url.PathEscape(vmUUID)+"/"+url.PathEscape(name), nil, nil, nil)
}

// ForgetVM removes every catalog object of VM vmUUID that the calling host owns (the VM
// is gone for good) and returns them, with the VM's objects another host owns, which stay.
// A VM with no objects of this host is not an error: Removed is empty.
func (c *Client) ForgetVM(ctx context.Context, vmUUID string) (apiv1.ForgetResponse, error) {
	var r apiv1.ForgetResponse
	err := c.do(ctx, http.MethodDelete, apiv1.PathHostObjects+"/"+url.PathEscape(vmUUID), nil, nil, &r)
	return r, err
}

// MoveVM makes the calling host the owner of VM vmUUID's catalog objects, after the VM
// migrated to it, and returns them; a host changes only its own objects (code
// "not_owner" otherwise), and only a VM the catalog holds can be moved ("not_found").
func (c *Client) MoveVM(ctx context.Context, vmUUID string) ([]apiv1.Object, error) {
	var r apiv1.ObjectsResponse
	err := c.do(ctx, http.MethodPost, apiv1.PathHostMoves, nil, apiv1.MoveRequest{VMUUID: vmUUID}, &r)
	return r.Objects, err
}

// Status returns the provider's state (admin).
func (c *Client) Status(ctx context.Context) (apiv1.Status, error) {
	var s apiv1.Status
	err := c.do(ctx, http.MethodGet, apiv1.PathStatus, nil, nil, &s)
	return s, err
}

// Backup writes a new age-encrypted backup archive to w (admin). The passphrase travels
// only inside the mTLS request body. The backup does not count until ConfirmBackup: store
// the archive durably, open it again with the passphrase, then confirm its SHA-256.
// Backup checks the bytes received against the SHA-256 the provider sent.
func (c *Client) Backup(ctx context.Context, w io.Writer, passphrase []byte) (int64, error) {
	resp, err := c.send(ctx, http.MethodPost, apiv1.PathBackup, nil, apiv1.BackupRequest{Passphrase: passphrase})
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sum := sha256.New()
	n, err := io.Copy(io.MultiWriter(w, sum), resp.Body)
	if err != nil {
		return n, fmt.Errorf("provider backup: receiving the archive after %d bytes: %w (the backup is not confirmed; take it again)", n, err)
	}
	if want := resp.Header.Get(apiv1.HeaderArchiveSHA256); want != "" && !strings.EqualFold(want, hex.EncodeToString(sum.Sum(nil))) {
		return n, fmt.Errorf("provider backup: the %d bytes received do not hash to the archive's SHA-256 %s (damaged in transfer; take the backup again)", n, want)
	}
	return n, nil
}

// ConfirmBackup tells the provider that the archive with this hex SHA-256 is stored and
// opens with its passphrase (admin): only then do its KDK versions count as backed up.
func (c *Client) ConfirmBackup(ctx context.Context, sha256Hex string) (apiv1.BackupInfo, error) {
	var info apiv1.BackupInfo
	err := c.do(ctx, http.MethodPost, apiv1.PathBackupConfirm, nil, apiv1.BackupConfirmRequest{SHA256: sha256Hex}, &info)
	return info, err
}

// VerifyBackup has the provider open and check an archive (admin).
func (c *Client) VerifyBackup(ctx context.Context, archive, passphrase []byte) (apiv1.BackupInfo, error) {
	var info apiv1.BackupInfo
	err := c.do(ctx, http.MethodPost, apiv1.PathBackupVerify, nil, apiv1.ArchiveRequest{Passphrase: passphrase, Archive: archive}, &info)
	return info, err
}

// CreateToken creates a single-use join token (admin); ttl 0 is the provider's default.
func (c *Client) CreateToken(ctx context.Context, ttl time.Duration) (apiv1.Token, error) {
	var t apiv1.Token
	err := c.do(ctx, http.MethodPost, apiv1.PathTokens, nil, apiv1.TokenRequest{TTLSeconds: int64(ttl / time.Second)}, &t)
	return t, err
}

// Hosts lists enrolled hosts (admin).
func (c *Client) Hosts(ctx context.Context) ([]apiv1.Host, error) {
	var r apiv1.HostsResponse
	err := c.do(ctx, http.MethodGet, apiv1.PathHosts, nil, nil, &r)
	return r.Hosts, err
}

// Revoke refuses a host from now on, on every replica (admin).
func (c *Client) Revoke(ctx context.Context, hostID string) error {
	return c.do(ctx, http.MethodPost, apiv1.PathHosts+"/"+url.PathEscape(hostID)+"/revoke", nil, nil, nil)
}

// Rotate makes a new KDK version primary (admin).
func (c *Client) Rotate(ctx context.Context) (apiv1.KDKVersion, error) {
	var v apiv1.KDKVersion
	err := c.do(ctx, http.MethodPost, apiv1.PathRotate, nil, nil, &v)
	return v, err
}

// Retire retires a KDK version that no catalogued object uses (admin).
func (c *Client) Retire(ctx context.Context, version int) error {
	return c.do(ctx, http.MethodPost, apiv1.PathKDKs+"/"+strconv.Itoa(version)+"/retire", nil, nil, nil)
}

// Objects lists catalogued objects, optionally of one VM and/or one KDK version (admin).
func (c *Client) Objects(ctx context.Context, vmUUID string, kdkVersion int) ([]apiv1.Object, error) {
	q := url.Values{}
	if vmUUID != "" {
		q.Set("vm", vmUUID)
	}
	if kdkVersion > 0 {
		q.Set("kdk_version", strconv.Itoa(kdkVersion))
	}
	var r apiv1.ObjectsResponse
	err := c.do(ctx, http.MethodGet, apiv1.PathObjects, q, nil, &r)
	return r.Objects, err
}

// ForgetObjects removes VM vmUUID's catalog objects (only object name, if not "") that
// a revoked or no longer enrolled host registered, and returns them (admin). Objects of a
// live host are refused (code "in_use"): that host forgets its VMs itself.
func (c *Client) ForgetObjects(ctx context.Context, vmUUID, name string) ([]apiv1.Object, error) {
	var r apiv1.ObjectsResponse
	err := c.do(ctx, http.MethodPost, apiv1.PathObjectsForget, nil, apiv1.ForgetRequest{VMUUID: vmUUID, Name: name}, &r)
	return r.Objects, err
}

// Audit returns the last n audit records (admin); n <= 0 returns as many as the
// provider allows (10,000).
func (c *Client) Audit(ctx context.Context, n int) ([]apiv1.AuditRecord, error) {
	q := url.Values{}
	q.Set("n", strconv.Itoa(max(n, 0)))
	var r apiv1.AuditResponse
	err := c.do(ctx, http.MethodGet, apiv1.PathAudit, q, nil, &r)
	return r.Records, err
}

// AuditVerify has the provider check the audit log's hash chain (admin).
func (c *Client) AuditVerify(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, apiv1.PathAuditVerify, nil, nil, nil)
}

// PruneAudit deletes the audit records dated before before (admin); with dryRun it only
// reports what would go. The provider refuses (code not_backed_up) to delete the audit
// head of the newest confirmed backup or anything later.
func (c *Client) PruneAudit(ctx context.Context, before time.Time, dryRun bool) (apiv1.AuditPruneResponse, error) {
	var r apiv1.AuditPruneResponse
	err := c.do(ctx, http.MethodPost, apiv1.PathAuditPrune, nil, apiv1.AuditPruneRequest{Before: before, DryRun: dryRun}, &r)
	return r, err
}

// Policy returns the provider's policy (admin).
func (c *Client) Policy(ctx context.Context) (apiv1.Policy, error) {
	var p apiv1.Policy
	err := c.do(ctx, http.MethodGet, apiv1.PathPolicy, nil, nil, &p)
	return p, err
}

// SetPolicy replaces the provider's policy (admin).
func (c *Client) SetPolicy(ctx context.Context, p apiv1.Policy) (apiv1.Policy, error) {
	var out apiv1.Policy
	err := c.do(ctx, http.MethodPut, apiv1.PathPolicy, nil, p, &out)
	return out, err
}

// Admins lists the administrator certificates the provider issued (admin).
func (c *Client) Admins(ctx context.Context) ([]apiv1.Admin, error) {
	var r apiv1.AdminsResponse
	err := c.do(ctx, http.MethodGet, apiv1.PathAdmins, nil, nil, &r)
	return r.Admins, err
}

// AddAdmin has the provider issue an administrator certificate named name for key
// (admin). The key never leaves the caller; the result holds it with the certificate.
func (c *Client) AddAdmin(ctx context.Context, name string, key crypto.Signer) (tls.Certificate, error) {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("add admin %q: creating the certificate request: %w", name, err)
	}
	var r apiv1.AdminCertResponse
	if err := c.do(ctx, http.MethodPost, apiv1.PathAdmins, nil, apiv1.AdminCertRequest{CSR: csr}, &r); err != nil {
		return tls.Certificate{}, fmt.Errorf("add admin %q: %w", name, err)
	}
	return c.certificate(r.Certificate, key)
}

// RevokeAdmin revokes the administrator certificate with serial ref, or every live one
// of the admin named ref (admin). It returns the certificates revoked now.
func (c *Client) RevokeAdmin(ctx context.Context, ref string) ([]apiv1.Admin, error) {
	var r apiv1.AdminsResponse
	err := c.do(ctx, http.MethodPost, apiv1.PathAdminsRevoke, nil, apiv1.AdminRevokeRequest{Admin: ref}, &r)
	return r.Admins, err
}

// certificate checks an issued client certificate against the pinned CA (the response's
// CA chain only repeats it) and pairs it with its key.
func (c *Client) certificate(der []byte, key crypto.Signer) (tls.Certificate, error) {
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("the provider returned an unreadable certificate: %w", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: poolOf(c.ca), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return tls.Certificate{}, fmt.Errorf("the issued certificate does not chain to the trusted provider CA %s: %w", CAHash(c.ca), err)
	}
	if !publicKeyMatches(leaf, key) {
		return tls.Certificate{}, errors.New("the issued certificate is not for the key that was sent")
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

func publicKeyMatches(cert *x509.Certificate, key crypto.Signer) bool {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(cert.PublicKey)
}

// Renew has the provider issue the calling host a new certificate for key (its current
// key or a new one), with the same host ID (host). From then on this Client presents the
// new certificate: new connections use it and the old ones are dropped once idle. The
// caller stores the returned certificate durably (with key) before anything else; the
// provider keeps accepting the old one until the new one is first presented, so a crash
// before it is stored does not lock the host out.
func (c *Client) Renew(ctx context.Context, key crypto.Signer) (tls.Certificate, error) {
	c.tcMu.Lock()
	defer c.tcMu.Unlock()
	if c.ca == nil || len(c.tc.Certificates) == 0 {
		return tls.Certificate{}, errors.New("renew: this client has no host certificate to renew")
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("renew: creating the certificate request: %w", err)
	}
	var r apiv1.EnrollResponse
	if err := c.do(ctx, http.MethodPost, apiv1.PathHostRenew, nil, apiv1.HostRenewRequest{CSR: csr}, &r); err != nil {
		return tls.Certificate{}, fmt.Errorf("renew: %w", err)
	}
	cert, err := c.certificate(r.Certificate, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("renew: %w", err)
	}
	if cert.Leaf.Subject.CommonName != r.HostID {
		return tls.Certificate{}, fmt.Errorf("renew: the new certificate names %q, not host %s", cert.Leaf.Subject.CommonName, r.HostID)
	}
	tc := c.tc.Clone()
	tc.Certificates = []tls.Certificate{cert}
	c.tc = tc
	old := c.hc.Swap(c.httpClient(tc))
	old.CloseIdleConnections()
	return cert, nil
}
