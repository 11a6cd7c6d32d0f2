package daemon

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

// Files in a provider directory.
const (
	// RootKeyFile is the provider root key (0600), made by Init or Restore.
	RootKeyFile = "root.key"
	// StoreFile is the bbolt store (0600) when the store is "bolt".
	StoreFile = "provider.db"
	// CACertFile is the provider CA certificate (PEM), for nkpctl and for pinning.
	CACertFile = "ca.crt"
	// AdminCertFile and AdminKeyFile are nkpctl's admin credentials (PEM, 0600).
	AdminCertFile = "admin.crt"
	AdminKeyFile  = "admin.key"
)

// newKeyAndCSR makes an ECDSA P-256 key and a DER CSR for it.
func newKeyAndCSR(cn string) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating a key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating a certificate request: %w", err)
	}
	return key, csr, nil
}

// writeCredentials stores a certificate and its key as PEM files (both 0600).
func writeCredentials(certPath, keyPath string, certDER []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding the key for %s: %w", keyPath, err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	defer clear(keyPEM)
	defer clear(keyDER)
	if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}), 0o600)
}

// writeCACert stores the CA certificate as PEM (0644: it is public).
func writeCACert(path string, ca *x509.Certificate) error {
	return atomicfile.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}), 0o644)
}

// Admin holds nkpctl's credentials read from a provider directory.
type Admin struct {
	CA          *x509.Certificate
	Certificate tls.Certificate
}

// LoadAdmin reads ca.crt, admin.crt and admin.key from dir (as written by Init/Restore).
func LoadAdmin(dir string) (*Admin, error) {
	return LoadAdminFiles(filepath.Join(dir, AdminCertFile), filepath.Join(dir, AdminKeyFile), filepath.Join(dir, CACertFile))
}

// LoadAdminFiles reads admin credentials from explicit PEM files.
// The key must be closed to group and others (chmod 600), as Init writes it.
func LoadAdminFiles(certFile, keyFile, caFile string) (*Admin, error) {
	if st, err := os.Stat(keyFile); err == nil && st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("admin key %s has mode %04o: group or others may read it and act as this administrator; run chmod 600 %s (and revoke this certificate with `nkpctl provider admins revoke` if others could read it)", keyFile, st.Mode().Perm(), keyFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("admin credentials %s, %s: %w (run `nkpctl provider init --dir DIR` first, or pass --dir/--cert/--key)", certFile, keyFile, err)
	}
	ca, err := LoadCACert(caFile)
	if err != nil {
		return nil, err
	}
	return &Admin{CA: ca, Certificate: cert}, nil
}

// LoadCACert reads a PEM CA certificate.
func LoadCACert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("CA certificate %s: no PEM CERTIFICATE block", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CA certificate %s: %w", path, err)
	}
	if !c.IsCA {
		return nil, errors.New("CA certificate " + path + ": not a CA certificate")
	}
	return c, nil
}

// WriteAdminDir writes another administrator's credentials into dir (made 0700 if
// missing): ca.crt, admin.crt and admin.key (0600), the layout nkpctl's --dir reads.
// It refuses to overwrite existing admin files.
func WriteAdminDir(dir string, ca *x509.Certificate, certDER []byte, key *ecdsa.PrivateKey) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("admin directory %s: %w", dir, err)
	}
	for _, f := range []string{AdminCertFile, AdminKeyFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("admin directory %s: %s exists already; give an empty directory", dir, f)
		}
	}
	if err := writeCACert(filepath.Join(dir, CACertFile), ca); err != nil {
		return err
	}
	return writeCredentials(filepath.Join(dir, AdminCertFile), filepath.Join(dir, AdminKeyFile), certDER, key)
}
