package client

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
)

// JoinRequest is what a host needs to enroll.
type JoinRequest struct {
	// URL of the provider.
	URL string
	// Token is the join token's secret from `nkpctl provider token create`.
	Token string
	// CAHash pins the provider CA ("sha256:<hex>", shown with the token and by status).
	CAHash string
	// Hostname names the host in the provider's inventory.
	Hostname string
	// Key is the host's private key; the certificate is issued for its public part.
	Key crypto.Signer
	// EKPublic is the host TPM's endorsement key public part (TPM2B_PUBLIC or PKIX DER);
	// nil for a host without a TPM.
	EKPublic []byte
	// Timeout bounds the request; 0 means 30 s.
	Timeout time.Duration
}

// Enrollment is a joined host's identity.
type Enrollment struct {
	HostID      string
	Certificate tls.Certificate // the issued certificate with Key
	CA          *x509.Certificate
}

// Join enrolls a host: it connects trusting only a CA whose public key matches
// req.CAHash, sends the token and a CSR for req.Key, and returns the issued certificate.
func Join(ctx context.Context, req JoinRequest) (*Enrollment, error) {
	if req.Key == nil || req.Token == "" || req.Hostname == "" {
		return nil, errors.New("join: key, token and hostname are required")
	}
	want := strings.ToLower(strings.TrimSpace(req.CAHash))
	if !strings.HasPrefix(want, "sha256:") || len(want) != len("sha256:")+64 {
		return nil, fmt.Errorf("join: CA hash %q: want sha256:<64 hex digits> as printed by `nkpctl provider token create`", req.CAHash)
	}
	var pinned *x509.Certificate
	tc := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // replaced by VerifyConnection: the CA is pinned by hash
		VerifyConnection: func(cs tls.ConnectionState) error {
			for _, c := range cs.PeerCertificates {
				if c.IsCA && CAHash(c) == want {
					if err := verifyAgainst(c)(cs); err != nil {
						return err
					}
					pinned = c
					return nil
				}
			}
			return fmt.Errorf("join: the provider's CA does not match the pinned hash %s: check --ca-hash (another provider, or an interception)", want)
		},
	}
	c, err := newClient([]string{req.URL}, tc, req.Timeout, 0)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: req.Hostname},
	}, req.Key)
	if err != nil {
		return nil, fmt.Errorf("join: creating the certificate request: %w", err)
	}
	var resp apiv1.EnrollResponse
	err = c.do(ctx, http.MethodPost, apiv1.PathEnroll, nil, apiv1.EnrollRequest{
		Token: req.Token, CSR: csr, Hostname: req.Hostname, EKPublic: req.EKPublic,
	}, &resp)
	if err != nil {
		return nil, fmt.Errorf("join %s: %w", req.URL, err)
	}
	leaf, err := x509.ParseCertificate(resp.Certificate)
	if err != nil {
		return nil, fmt.Errorf("join: the provider returned an unreadable certificate: %w", err)
	}
	if pinned == nil {
		return nil, errors.New("join: connection closed before the CA was pinned")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: poolOf(pinned), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, fmt.Errorf("join: the issued certificate does not chain to the pinned CA: %w", err)
	}
	return &Enrollment{
		HostID:      resp.HostID,
		Certificate: tls.Certificate{Certificate: [][]byte{resp.Certificate}, PrivateKey: req.Key, Leaf: leaf},
		CA:          pinned,
	}, nil
}

func poolOf(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}
