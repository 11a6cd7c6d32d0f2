package provider

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// CreateToken makes a single-use join token valid for ttl (0: DefaultTokenTTL; at most
// MaxTokenTTL). Only a hash of its secret is stored.
func (p *Provider) CreateToken(ctx context.Context, ttl time.Duration) (Token, error) {
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < 0 || ttl > MaxTokenTTL {
		return Token{}, fmt.Errorf("token: ttl %s: %w: give a duration between 1s and %s", ttl, ErrBadRequest, MaxTokenTTL)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return Token{}, fmt.Errorf("token: reading random bytes: %w", err)
	}
	id := uuid.NewString()
	tok := Token{ID: id, Secret: id + "." + base64.RawURLEncoding.EncodeToString(raw)}
	clear(raw)
	sum := sha256.Sum256([]byte(tok.Secret))
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		now := a.now.UTC()
		tok.Expires = now.Add(ttl)
		rec := tokenRecord{ID: id, SecretHash: sum[:], Created: now, Expires: tok.Expires}
		if err := putJSON(tx, bucketTokens, id, rec); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindToken, Actor: actorOf(ctx), Subject: id, Details: map[string]string{
			"expires": tok.Expires.Format(time.RFC3339), "provider_id": m.ID,
		}})
	})
	if err != nil {
		return Token{}, fmt.Errorf("token: %w", err)
	}
	return tok, nil
}

// splitToken returns the token ID from "<id>.<random>".
func splitToken(secret string) (string, error) {
	id, rest, ok := strings.Cut(secret, ".")
	if !ok || rest == "" || len(secret) > 256 {
		return "", fmt.Errorf("%w: it is not of the form <id>.<secret> that `token create` prints", ErrTokenInvalid)
	}
	if _, err := uuid.Parse(id); err != nil {
		return "", fmt.Errorf("%w: its ID part is not a UUID", ErrTokenInvalid)
	}
	return id, nil
}

// checkToken returns nil if the token may be used now. An unknown token ID and a wrong
// secret give the same error (and both compare a hash), so a caller learns nothing about
// which token IDs exist.
func checkToken(tx store.Tx, id, secret string, now time.Time) (tokenRecord, error) {
	var t tokenRecord
	err := getJSON(tx, bucketTokens, id, &t)
	known := err == nil
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return t, err
	}
	sum := sha256.Sum256([]byte(secret))
	want := t.SecretHash
	if !known {
		want = make([]byte, sha256.Size)
	}
	if subtle.ConstantTimeCompare(sum[:], want) != 1 || !known {
		return tokenRecord{}, fmt.Errorf("token %s: %w: no token of this provider has this ID and secret; "+
			"copy the whole token that `nkpctl provider token create` printed, or create a new one", id, ErrTokenInvalid)
	}
	if t.Used != nil {
		return t, fmt.Errorf("token %s: %w at %s by host %s; tokens are single use, create a new one", id, ErrTokenUsed, t.Used.Format(time.RFC3339), t.HostID)
	}
	if !now.Before(t.Expires) {
		return t, fmt.Errorf("token %s: %w at %s (provider time %s); create a new one", id, ErrTokenExpired, t.Expires.Format(time.RFC3339), now.Format(time.RFC3339))
	}
	return t, nil
}

func checkHostname(h string) error {
	if h == "" || len(h) > 253 {
		return fmt.Errorf("hostname %.40q: %w: give 1 to 253 characters", h, ErrBadRequest)
	}
	for _, r := range h {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return fmt.Errorf("hostname %.40q: %w: only printable characters without spaces", h, ErrBadRequest)
		}
	}
	return nil
}

// Enroll consumes a join token and issues the host its certificate. With policy
// tpm-required on, a host without EKPublic is refused (ErrTPMRequired) and its token is
// left unused.
func (p *Provider) Enroll(ctx context.Context, req EnrollRequest) (EnrollResponse, error) {
	resp, tokenID, err := p.enroll(ctx, req)
	if err != nil {
		p.log.Warn("enrollment refused", "hostname", req.Hostname, "token_id", tokenID, "err", err)
		// Only replays of a real token (its secret was right) are audited: anyone can send
		// unknown tokens, and recording those would let them fill the store.
		if errors.Is(err, ErrTokenUsed) || errors.Is(err, ErrTokenExpired) {
			p.auditRefusal(ctx, "enroll_refused", "token:"+tokenID, tokenID, err)
		}
		return EnrollResponse{}, fmt.Errorf("enroll %q: %w", req.Hostname, err)
	}
	return resp, nil
}

func (p *Provider) enroll(ctx context.Context, req EnrollRequest) (EnrollResponse, string, error) {
	tokenID, err := splitToken(req.Token)
	if err != nil {
		return EnrollResponse{}, "", err
	}
	if err := checkHostname(req.Hostname); err != nil {
		return EnrollResponse{}, tokenID, err
	}
	if _, err := ca.ParseCSR(req.CSR); err != nil {
		return EnrollResponse{}, tokenID, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	var ekDER []byte
	if len(req.EKPublic) > 0 {
		if _, ekDER, err = parseEK(req.EKPublic); err != nil {
			return EnrollResponse{}, tokenID, err
		}
	}
	checks := func(tx store.Tx, now time.Time) (metaRecord, error) {
		m, err := readMeta(tx)
		if err != nil {
			return m, err
		}
		if _, err := checkToken(tx, tokenID, req.Token, now); err != nil {
			return m, err
		}
		if m.Policy.TPMRequired && ekDER == nil {
			return m, fmt.Errorf("%w: this provider only enrolls hosts with a TPM (policy tpm-required); join with the host's TPM, or turn the policy off", ErrTPMRequired)
		}
		return m, nil
	}
	// Check before signing anything, then again inside the transaction that uses the token.
	var providerID string
	if err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := checks(tx, p.now())
		providerID = m.ID
		return err
	}); err != nil {
		return EnrollResponse{}, tokenID, err
	}
	authority, err := p.loadCA(ctx, providerID)
	if err != nil {
		return EnrollResponse{}, tokenID, err
	}
	hostID := uuid.NewString()
	now := p.now().UTC()
	issued, err := authority.IssueHost(req.CSR, hostID, now, p.cfg.HostCertValidity)
	if err != nil {
		return EnrollResponse{}, tokenID, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := checks(tx, a.now)
		if err != nil {
			return err
		}
		if m.ID != providerID {
			return fmt.Errorf("the store now holds provider %s (restored during the enrollment); enroll again", m.ID)
		}
		var t tokenRecord
		if err := getJSON(tx, bucketTokens, tokenID, &t); err != nil {
			return err
		}
		used := a.now.UTC()
		t.Used, t.HostID = &used, hostID
		if err := putJSON(tx, bucketTokens, tokenID, t); err != nil {
			return err
		}
		h := hostRecord{ID: hostID, Hostname: req.Hostname, Enrolled: used, CertSerial: issued.Serial,
			CertNotAfter: issued.Cert.NotAfter, EKPublic: ekDER, TokenID: tokenID}
		if err := putJSON(tx, bucketHosts, hostID, h); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindEnroll, Actor: "host:" + hostID, Subject: hostID, Details: map[string]string{
			"hostname": req.Hostname, "token_id": tokenID, "tpm": fmt.Sprint(ekDER != nil), "cert_serial": issued.Serial,
		}})
	})
	if err != nil {
		return EnrollResponse{}, tokenID, err
	}
	return EnrollResponse{HostID: hostID, Certificate: issued.DER, CAChain: [][]byte{authority.Certificate().Raw}}, tokenID, nil
}

// auditRefusal records a refused action in the audit log, best effort (the refusal
// itself is the caller's result; a failure to record it is logged).
func (p *Provider) auditRefusal(ctx context.Context, kind audit.Kind, actor, subject string, reason error) {
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		return a.add(tx, audit.Event{Kind: kind, Actor: actor, Subject: subject, Details: map[string]string{"reason": errReason(reason)}})
	})
	if err != nil {
		p.log.Warn("recording a refusal in the audit log failed", "kind", string(kind), "subject", subject, "err", err)
	}
}

// errReason names the sentinel behind err, for audit details.
func errReason(err error) string {
	for _, s := range []error{ErrTokenUsed, ErrTokenExpired, ErrTokenInvalid, ErrHostRevoked, ErrHostUnknown, ErrTPMRequired, ErrNotBackedUp} {
		if errors.Is(err, s) {
			return s.Error()
		}
	}
	return "other"
}

// IssueAdminCert issues an administrator client certificate (role nkp-admin) from a DER
// CSR; the CSR's CN names the admin ("admin" if empty).
func (p *Provider) IssueAdminCert(ctx context.Context, csrDER []byte) ([]byte, error) {
	csr, err := ca.ParseCSR(csrDER)
	if err != nil {
		return nil, fmt.Errorf("admin certificate: %w: %w", ErrBadRequest, err)
	}
	name := csr.Subject.CommonName
	if name == "" {
		name = "admin"
	}
	if err := checkHostname(name); err != nil {
		return nil, fmt.Errorf("admin certificate: CN: %w", err)
	}
	return p.issue(ctx, audit.KindAdminCert, name, func(c *ca.CA, now time.Time) (ca.Issued, error) {
		return c.IssueAdmin(csrDER, name, now, p.cfg.AdminCertValidity)
	}, func(tx store.Tx, iss ca.Issued, now time.Time) error {
		rec := adminRecord{Name: name, Serial: iss.Serial, Issued: now.UTC(), NotAfter: iss.Cert.NotAfter.UTC()}
		return putJSON(tx, bucketAdmins, iss.Serial, rec)
	})
}

// IssueServerCert issues the HTTPS server certificate (role nkp-server) for names (DNS
// names or IP literals) from a DER CSR.
func (p *Provider) IssueServerCert(ctx context.Context, csrDER []byte, names []string) ([]byte, error) {
	return p.issue(ctx, "server_cert", strings.Join(names, ","), func(c *ca.CA, now time.Time) (ca.Issued, error) {
		return c.IssueServer(csrDER, names, now, p.cfg.ServerCertValidity)
	}, nil)
}

// issue signs with fn and records the issuance (audit, and record when not nil) in one
// transaction.
func (p *Provider) issue(ctx context.Context, kind audit.Kind, subject string, fn func(*ca.CA, time.Time) (ca.Issued, error),
	record func(store.Tx, ca.Issued, time.Time) error) ([]byte, error) {
	authority, err := p.currentCA(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	issued, err := fn(authority, p.now().UTC())
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", kind, ErrBadRequest, err)
	}
	if len(subject) > audit.MaxFieldLen {
		subject = subject[:audit.MaxFieldLen]
	}
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		if record != nil {
			if err := record(tx, issued, a.now); err != nil {
				return err
			}
		}
		return a.add(tx, audit.Event{Kind: kind, Actor: actorOf(ctx), Subject: subject, Details: map[string]string{"cert_serial": issued.Serial}})
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	return issued.DER, nil
}

// Hosts lists the enrolled hosts, revoked ones included.
func (p *Provider) Hosts(ctx context.Context) ([]Host, error) {
	return listPublic(ctx, p, "hosts", listHosts)
}

// Revoke refuses the host from now on, on every replica sharing the store. Revoking a
// revoked host is not an error.
func (p *Provider) Revoke(ctx context.Context, hostID string) error {
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		if _, err := readMeta(tx); err != nil {
			return err
		}
		h, err := readHost(tx, hostID)
		if err != nil {
			return err
		}
		if h.Revoked != nil {
			return nil
		}
		now := a.now.UTC()
		h.Revoked = &now
		if err := putJSON(tx, bucketHosts, hostID, h); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindRevoke, Actor: actorOf(ctx), Subject: hostID, Details: map[string]string{
			"hostname": h.Hostname, "cert_serial": h.CertSerial,
		}})
	})
	if err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	return nil
}

// AuthorizeHost checks a host's client certificate on every request: issued by this
// provider's CA for role nkp-host, still valid, the host's current certificate (or the
// one a renewal superseded, until the current one is first presented), and the host not
// revoked. It returns the host.
func (p *Provider) AuthorizeHost(ctx context.Context, cert *x509.Certificate) (Host, error) {
	if cert == nil {
		return Host{}, fmt.Errorf("authorize host: no client certificate: %w", ErrHostUnknown)
	}
	var a hostAuth
	err := p.st.View(ctx, func(tx store.Tx) error {
		if err := store.Prefetch(tx, a.reads(cert)...); err != nil {
			return err
		}
		return a.read(tx, cert)
	})
	if err != nil {
		return Host{}, fmt.Errorf("authorize host: %w", err)
	}
	h, err := p.authorize(ctx, cert, a)
	if err != nil {
		return Host{}, err
	}
	return h.public(), nil
}

// hostAuth is what AuthorizeHost reads from the store: the provider (to pick its CA) and
// the host the certificate names, which is trusted only once the certificate verifies.
type hostAuth struct {
	m       metaRecord
	h       hostRecord
	hostErr error // the host cannot be read: unknown, or a bad ID
}

// reads names the store keys read reads, for store.Prefetch.
func (a *hostAuth) reads(cert *x509.Certificate) []store.Read {
	return []store.Read{store.Key(bucketProvider, keyMeta), store.Key(bucketHosts, cert.Subject.CommonName)}
}

// read reads the provider and the host named by cert; only a failure to read the
// provider is returned, the host's is kept in hostErr.
func (a *hostAuth) read(tx store.Tx, cert *x509.Certificate) error {
	*a = hostAuth{}
	var err error
	if a.m, err = readMeta(tx); err != nil {
		return err
	}
	if checkUUID("host ID", cert.Subject.CommonName) != nil {
		a.hostErr = fmt.Errorf("certificate CN %.40q is not a host ID: %w", cert.Subject.CommonName, ErrHostUnknown)
		return nil
	}
	a.h, a.hostErr = readHost(tx, cert.Subject.CommonName)
	return nil
}

// authorize decides on what read read: the certificate verifies to the provider's CA,
// the host exists, is not revoked, and cert is its current certificate.
func (p *Provider) authorize(ctx context.Context, cert *x509.Certificate, a hostAuth) (hostRecord, error) {
	authority, err := p.loadCA(ctx, a.m.ID)
	if err != nil {
		return hostRecord{}, fmt.Errorf("authorize host: %w", err)
	}
	hostID, err := p.verifyCert(authority, a.m.ID, cert, ca.RoleHost)
	if err != nil {
		return hostRecord{}, fmt.Errorf("authorize host: %w: %w", ErrHostUnknown, err)
	}
	if a.hostErr != nil {
		return hostRecord{}, fmt.Errorf("authorize host: %w", a.hostErr)
	}
	h := a.h
	if h.Revoked != nil {
		return hostRecord{}, fmt.Errorf("authorize host %s (%s): %w at %s; enroll it again with a new token if it should come back",
			hostID, h.Hostname, ErrHostRevoked, h.Revoked.Format(time.RFC3339))
	}
	serial := cert.SerialNumber.Text(16)
	switch {
	case serial == h.CertSerial && h.PrevCertSerial != "":
		p.retirePrevious(ctx, hostID, serial) // the host has its renewed certificate
	case serial == h.CertSerial, serial == h.PrevCertSerial && h.PrevCertSerial != "":
	default:
		return hostRecord{}, fmt.Errorf("authorize host %s (%s): certificate serial %s is not its current one (%s): %w",
			hostID, h.Hostname, serial, h.CertSerial, ErrHostUnknown)
	}
	return h, nil
}

// maxVerified bounds the cache of verified client certificates.
const maxVerified = 4096

// verifiedCert is a client certificate whose signature chain was checked against the CA
// of provider caID, for role.
type verifiedCert struct {
	caID      string
	role      ca.Role
	cn        string
	notBefore time.Time
	notAfter  time.Time
}

// verifyCert verifies cert's chain to the CA, and that it carries role, once per
// certificate (a signature check per request costs more than the rest of AuthorizeHost);
// its validity period is checked against the clock on every call. This is the only place
// a client certificate's chain is verified: the HTTP edge hands the certificate over
// unverified (AuthorizeHost, ReleaseTo, RenewHost, AuthorizeAdmin). Errors wrap
// ca.ErrNotIssued, and also ca.ErrWrongRole for a valid certificate of another role.
func (p *Provider) verifyCert(authority *ca.CA, caID string, cert *x509.Certificate, role ca.Role) (string, error) {
	sum := sha256.Sum256(cert.Raw)
	now := p.now()
	p.verifiedMu.Lock()
	v, ok := p.verified[sum]
	p.verifiedMu.Unlock()
	if ok && v.caID == caID && v.role == role && !now.Before(v.notBefore) && !now.After(v.notAfter) {
		return v.cn, nil
	}
	cn, err := authority.Verify(cert, role, now)
	if err != nil {
		return "", err
	}
	p.verifiedMu.Lock()
	defer p.verifiedMu.Unlock()
	if len(p.verified) >= maxVerified {
		clear(p.verified)
	}
	p.verified[sum] = verifiedCert{caID: caID, role: role, cn: cn, notBefore: cert.NotBefore, notAfter: cert.NotAfter}
	return cn, nil
}
