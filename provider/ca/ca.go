// Package ca is the provider's certificate authority: one ECDSA P-256 self-signed CA that
// issues the certificates used for mTLS between the provider, its hosts and nkpctl.
//
// A certificate's role is its single Subject OU: "nkp-host" (CN = host ID), "nkp-admin"
// (CN = admin name) or "nkp-server" (the provider's HTTPS server). The subject in a CSR is
// ignored; the CA sets it. Hosts pin the CA by Hash ("sha256:" + hex SHA-256 of the CA
// certificate's SubjectPublicKeyInfo), so a re-issued CA certificate over the same key
// keeps the pin.
//
// Only package provider imports this; provider/api reads the role constants.
package ca

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// Role is what a certificate may do, carried as its Subject OU.
type Role string

// Roles.
const (
	RoleHost   Role = "nkp-host"
	RoleAdmin  Role = "nkp-admin"
	RoleServer Role = "nkp-server"
)

// ClockSkew is how far back NotBefore is set, so a host whose clock runs a little behind
// the provider's accepts its new certificate.
const ClockSkew = 5 * time.Minute

// Errors, checked with errors.Is.
var (
	// ErrBadCSR: the certificate request does not parse, its signature is wrong, or its
	// key type is not accepted.
	ErrBadCSR = errors.New("bad certificate request")
	// ErrNotIssued: a certificate was not issued by this CA, is outside its validity, or
	// has another role than the one required.
	ErrNotIssued = errors.New("certificate not valid for this provider")
	// ErrWrongRole: a certificate this CA issued and that is valid now carries another
	// role than the one required (an admin certificate on a host route). Errors wrapping
	// it wrap ErrNotIssued too.
	ErrWrongRole = errors.New("certificate has the wrong role")
)

// CA is a loaded certificate authority. It is safe for concurrent use.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

// New generates a CA key and a self-signed certificate named after providerID.
func New(providerID string, now time.Time, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generating key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "nkp provider CA " + providerID, Organization: []string{"nkp"}},
		NotBefore:             now.Add(-ClockSkew),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("ca: self-signing: %w", err)
	}
	return build(der, key)
}

// Parse loads a CA from its certificate (DER) and its PKCS#8 private key (DER).
func Parse(certDER, keyPKCS8 []byte) (*CA, error) {
	k, err := x509.ParsePKCS8PrivateKey(keyPKCS8)
	if err != nil {
		return nil, fmt.Errorf("ca: parsing private key: %w", err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("ca: private key is %T, want ECDSA", k)
	}
	return build(certDER, key)
}

func build(certDER []byte, key *ecdsa.PrivateKey) (*CA, error) {
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("ca: parsing certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("ca: certificate %q is not a CA", cert.Subject)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("ca: private key does not match certificate %q", cert.Subject)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{cert: cert, key: key, pool: pool}, nil
}

// Certificate is the CA certificate.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// Pool is a pool holding only the CA certificate, for tls.Config.ClientCAs/RootCAs.
func (c *CA) Pool() *x509.CertPool { return c.pool }

// Hash is what hosts pin: "sha256:<hex of the CA certificate's SubjectPublicKeyInfo>".
func (c *CA) Hash() string { return Hash(c.cert) }

// Hash gives the pin of any certificate: "sha256:" + hex SHA-256 of its
// SubjectPublicKeyInfo.
func Hash(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// MarshalKey returns the CA private key as PKCS#8 DER. The caller seals it and wipes the
// returned slice.
func (c *CA) MarshalKey() ([]byte, error) {
	b, err := x509.MarshalPKCS8PrivateKey(c.key)
	if err != nil {
		return nil, fmt.Errorf("ca: marshalling private key: %w", err)
	}
	return b, nil
}

// Issued is a certificate the CA made.
type Issued struct {
	DER    []byte
	Serial string // hex
	Cert   *x509.Certificate
}

// IssueHost signs a client certificate for host hostID from a DER CSR.
func (c *CA) IssueHost(csrDER []byte, hostID string, now time.Time, validity time.Duration) (Issued, error) {
	return c.issue(csrDER, pkix.Name{CommonName: hostID, OrganizationalUnit: []string{string(RoleHost)}},
		[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil, nil, now, validity)
}

// IssueAdmin signs a client certificate for an administrator (nkpctl) from a DER CSR.
func (c *CA) IssueAdmin(csrDER []byte, name string, now time.Time, validity time.Duration) (Issued, error) {
	return c.issue(csrDER, pkix.Name{CommonName: name, OrganizationalUnit: []string{string(RoleAdmin)}},
		[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil, nil, now, validity)
}

// IssueServer signs a TLS server certificate from a DER CSR for names, each a DNS name or
// an IP address literal.
func (c *CA) IssueServer(csrDER []byte, names []string, now time.Time, validity time.Duration) (Issued, error) {
	if len(names) == 0 {
		return Issued{}, fmt.Errorf("ca: server certificate needs at least one DNS name or IP address: %w", ErrBadCSR)
	}
	var dns []string
	var ips []net.IP
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, n)
		}
	}
	return c.issue(csrDER, pkix.Name{CommonName: names[0], OrganizationalUnit: []string{string(RoleServer)}},
		[]x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, dns, ips, now, validity)
}

func (c *CA) issue(csrDER []byte, subject pkix.Name, eku []x509.ExtKeyUsage, dns []string, ips []net.IP, now time.Time, validity time.Duration) (Issued, error) {
	csr, err := ParseCSR(csrDER)
	if err != nil {
		return Issued{}, err
	}
	serial, err := newSerial()
	if err != nil {
		return Issued{}, err
	}
	notAfter := now.Add(validity)
	if notAfter.After(c.cert.NotAfter) {
		notAfter = c.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      subject,
		NotBefore:    now.Add(-ClockSkew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  eku,
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	if _, ok := csr.PublicKey.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, csr.PublicKey, c.key)
	if err != nil {
		return Issued{}, fmt.Errorf("ca: signing certificate for %q: %w", subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return Issued{}, fmt.Errorf("ca: parsing issued certificate: %w", err)
	}
	return Issued{DER: der, Serial: serial.Text(16), Cert: cert}, nil
}

// IsSerial reports whether s is a certificate serial as the CA writes it (Issued.Serial):
// 1 to 40 lower-case hex digits (at most 20 bytes, RFC 5280's bound).
func IsSerial(s string) bool {
	if s == "" || len(s) > 40 {
		return false
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return false
		}
	}
	return true
}

// ParseCSR parses a DER certificate request, checks its self-signature and accepts only
// ECDSA P-256/P-384, Ed25519 or RSA of 2048 bits or more.
func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("ca: %w: %w", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("ca: %w: signature: %w", ErrBadCSR, err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return nil, fmt.Errorf("ca: %w: ECDSA curve %s; use P-256 or P-384", ErrBadCSR, k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("ca: %w: RSA key of %d bits; use 2048 or more", ErrBadCSR, k.N.BitLen())
		}
	default:
		return nil, fmt.Errorf("ca: %w: key type %T; use ECDSA P-256", ErrBadCSR, csr.PublicKey)
	}
	return csr, nil
}

// Verify checks that cert was issued by this CA, is valid at now and has role; it
// returns the certificate's CN (the host ID or admin name).
func (c *CA) Verify(cert *x509.Certificate, role Role, now time.Time) (string, error) {
	if cert == nil {
		return "", fmt.Errorf("ca: no client certificate: %w", ErrNotIssued)
	}
	eku := x509.ExtKeyUsageClientAuth
	if role == RoleServer {
		eku = x509.ExtKeyUsageServerAuth
	}
	_, err := cert.Verify(x509.VerifyOptions{Roots: c.pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{eku}})
	if err != nil {
		return "", fmt.Errorf("ca: certificate %q: %w: %w", cert.Subject.CommonName, ErrNotIssued, err)
	}
	if got := RoleOf(cert); got != role {
		return "", fmt.Errorf("ca: certificate %q has role %q, want %q: %w: %w", cert.Subject.CommonName, got, role, ErrNotIssued, ErrWrongRole)
	}
	return cert.Subject.CommonName, nil
}

// RoleOf reads a certificate's role (its single Subject OU); "" if it has none or several.
func RoleOf(cert *x509.Certificate) Role {
	if cert == nil || len(cert.Subject.OrganizationalUnit) != 1 {
		return ""
	}
	return Role(cert.Subject.OrganizationalUnit[0])
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("ca: serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}
