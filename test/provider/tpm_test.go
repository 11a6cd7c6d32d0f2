package provider_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"testing"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/simulator"
	"google.golang.org/protobuf/proto"

	"github.com/nkp-dev/nkp/provider/apiv1"
	pclient "github.com/nkp-dev/nkp/provider/client"
)

// TestTPMHost: a host that registered its TPM's EK receives import blobs that its TPM
// unwraps to the same KDK a TPM-less host receives bare, and another TPM cannot unwrap
// them. With tpm-required on, a host without a TPM cannot enroll.
func TestTPMHost(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	dir, s := b.running(t)
	b.backUp(t, dir, s.url)

	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("TPM simulator: %v", err)
	}
	ek, err := client.EndorsementKeyRSA(sim)
	if err != nil {
		sim.Close()
		t.Fatalf("EK: %v", err)
	}
	ekDER, err := x509.MarshalPKIXPublicKey(ek.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	tpmHost, err := join(t, s.url, b.token(t, s, "10m"), "kvm-tpm", ekDER)
	if err != nil {
		t.Fatalf("join with EK: %v", err)
	}
	plainHost := b.mustJoin(t, s, "kvm-plain")

	rel, err := tpmHost.c.Release(ctx)
	if err != nil || len(rel.KDKs) != 1 || len(rel.KDKs[0].ImportBlob) == 0 || rel.KDKs[0].Bare != nil {
		t.Fatalf("release to the TPM host = %+v, %v; want an import blob only", rel, err)
	}
	bare, err := plainHost.c.Release(ctx)
	if err != nil || len(bare.KDKs) != 1 || len(bare.KDKs[0].Bare) != 32 {
		t.Fatalf("release to the TPM-less host = %+v, %v", bare, err)
	}
	var blob pb.ImportBlob
	if err := proto.Unmarshal(rel.KDKs[0].ImportBlob, &blob); err != nil {
		t.Fatalf("import blob does not parse: %v", err)
	}
	got, err := ek.Import(&blob)
	ek.Close()
	sim.Close()
	if err != nil {
		t.Fatalf("the host TPM did not unwrap its import blob: %v", err)
	}
	if !bytes.Equal(got, bare.KDKs[0].Bare) {
		t.Fatal("the KDK unwrapped by the TPM differs from the KDK of the same version")
	}

	other, err := simulator.Get() // fresh seeds: another TPM
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	otherEK, err := client.EndorsementKeyRSA(other)
	if err != nil {
		t.Fatal(err)
	}
	defer otherEK.Close()
	if k, err := otherEK.Import(&blob); err == nil {
		t.Fatalf("another TPM unwrapped the import blob (%d bytes)", len(k))
	}

	b.mustCtl(t, dir, s.url, "", "policy", "set", "tpm-required=on")
	if _, err := join(t, s.url, b.token(t, s, "10m"), "kvm-plain-2", nil); !pclient.IsCode(err, apiv1.CodeTPMRequired) {
		t.Fatalf("join without a TPM under tpm-required: %v, want %s", err, apiv1.CodeTPMRequired)
	}
	if _, err := plainHost.c.Release(ctx); !pclient.IsCode(err, apiv1.CodeTPMRequired) {
		t.Fatalf("release to a TPM-less host under tpm-required: %v, want %s", err, apiv1.CodeTPMRequired)
	}
	if _, err := tpmHost.c.Release(ctx); err != nil {
		t.Fatalf("release to the TPM host under tpm-required: %v", err)
	}
}
