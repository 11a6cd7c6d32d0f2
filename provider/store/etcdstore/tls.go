package etcdstore

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// LoadTLS builds Config.TLS from PEM files: the CA that signed etcd's server
// certificates, and the provider's client certificate and key for etcd's
// --client-cert-auth. certFile and keyFile may both be empty (server authentication
// only). The key file must not be readable by group or others.
func LoadTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("etcd CA %s: %w", caFile, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("etcd CA %s: no PEM certificate in it", caFile)
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if certFile == "" && keyFile == "" {
		return cfg, nil
	}
	if certFile == "" || keyFile == "" {
		return nil, fmt.Errorf("etcd client certificate: give both the certificate (%q) and the key (%q)", certFile, keyFile)
	}
	fi, err := os.Stat(keyFile)
	if err != nil {
		return nil, fmt.Errorf("etcd client key %s: %w", keyFile, err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("etcd client key %s: mode %v lets others read it; chmod 600 it", keyFile, perm)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("etcd client certificate %s and key %s: %w", certFile, keyFile, err)
	}
	cfg.Certificates = []tls.Certificate{pair}
	return cfg, nil
}
