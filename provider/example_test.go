package provider_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/rootkey"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

// The provider's lifecycle: init, a host joins, its release is refused until a backup
// exists, then it gets the KDK.
func Example() {
	ctx := context.Background()
	rk, _ := rootkey.Generate() // production: rootkey.Create/Load(dir + "/root.key")
	p, err := provider.Open(ctx, provider.Config{Store: mem.New(), RootKey: rk, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		panic(err)
	}
	st, _ := p.Init(ctx, provider.InitOptions{})
	fmt.Println("after init:", st.State)

	tok, _ := p.CreateToken(ctx, time.Hour)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // the host's own key
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	host, err := p.Enroll(ctx, provider.EnrollRequest{Token: tok.Secret, CSR: csr, Hostname: "kvm-01"})
	if err != nil {
		panic(err)
	}

	_, err = p.Release(ctx, host.HostID)
	fmt.Println("release before backup refused:", errors.Is(err, provider.ErrNotBackedUp))

	var archive bytes.Buffer
	info, err := p.Backup(ctx, &archive, []byte("a passphrase from a file or a prompt"))
	if err != nil {
		panic(err)
	}
	st, _ = p.Status(ctx)
	fmt.Println("backup written, not confirmed:", st.State)
	// The caller stores the archive durably, opens it again with the passphrase, then
	// confirms it by its SHA-256.
	if _, err := p.ConfirmBackup(ctx, info.SHA256); err != nil {
		panic(err)
	}
	st, _ = p.Status(ctx)
	fmt.Println("after backup:", st.State)

	kdks, _ := p.Release(ctx, host.HostID)
	fmt.Println("released:", len(kdks), "version", kdks[0].Version, "bare bytes", len(kdks[0].Bare))
	kdks[0].Wipe()
	// Output:
	// after init: NotBackedUp
	// release before backup refused: true
	// backup written, not confirmed: NotBackedUp
	// after backup: Active
	// released: 1 version 1 bare bytes 32
}
