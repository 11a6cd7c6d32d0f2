package provider_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/simulator"
	"google.golang.org/protobuf/proto"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/backup"
)

// simEK opens a simulated TPM with seed and returns it and its EK (RSA or ECC). The
// simulator allows one open instance per process: close it before the next.
func simEK(t *testing.T, seed int64, ecc bool) (*simulator.Simulator, *client.Key) {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatalf("simulator: %v", err)
	}
	ekFn := client.EndorsementKeyRSA
	if ecc {
		ekFn = client.EndorsementKeyECC
	}
	ek, err := ekFn(sim)
	if err != nil {
		sim.Close()
		t.Fatalf("EK: %v", err)
	}
	return sim, ek
}

func tpm2bPublic(t *testing.T, ek *client.Key) []byte {
	t.Helper()
	area, err := ek.PublicArea().Encode()
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte{byte(len(area) >> 8), byte(len(area))}, area...)
}

func TestReleaseToTPM(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		ecc  bool
		form string // how the host sends its EK
	}{
		{"RSA EK as TPM2B_PUBLIC", false, "tpm2b"},
		{"ECC EK as PKIX DER", true, "pkix"},
		{"ECC EK as TPMT_PUBLIC", true, "tpmt"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := initEnv(t, provider.Policy{TPMRequired: true})
			seed := int64(100 + i)
			sim, ek := simEK(t, seed, tt.ecc)
			var ekBytes []byte
			switch tt.form {
			case "tpm2b":
				ekBytes = tpm2bPublic(t, ek)
			case "tpmt":
				ekBytes = tpm2bPublic(t, ek)[2:]
			default:
				der, err := x509.MarshalPKIXPublicKey(ek.PublicKey())
				if err != nil {
					t.Fatal(err)
				}
				ekBytes = der
			}
			h := e.enroll(t, "kvm-tpm", ekBytes)
			if _, err := e.p.Rotate(ctx); err != nil {
				t.Fatal(err)
			}
			archive := e.backup(t, "pass: correct horse battery")
			doc, _, err := backup.Read(bytes.NewReader(archive), []byte("pass: correct horse battery"))
			if err != nil {
				t.Fatal(err)
			}
			defer doc.Wipe()
			rel, err := e.p.Release(ctx, h.id)
			if err != nil {
				t.Fatal(err)
			}
			if len(rel) != 2 {
				t.Fatalf("released %d versions, want 2", len(rel))
			}
			blobs := make([]*pb.ImportBlob, len(rel))
			for j, k := range rel {
				if k.Bare != nil || len(k.ImportBlob) == 0 {
					t.Fatalf("version %d: a TPM host got a bare key or no blob", k.Version)
				}
				blobs[j] = &pb.ImportBlob{}
				if err := proto.Unmarshal(k.ImportBlob, blobs[j]); err != nil {
					t.Fatal(err)
				}
				got, err := ek.Import(blobs[j])
				if err != nil {
					t.Fatalf("version %d: the host's TPM does not import its blob: %v", k.Version, err)
				}
				if !bytes.Equal(got, doc.KDKs[j].Key) {
					t.Fatalf("version %d: unwrapped KDK differs from the one in the backup", k.Version)
				}
			}
			ek.Close()
			sim.Close()

			// Another TPM (other seeds, so another EK) cannot unwrap the blobs.
			sim2, ek2 := simEK(t, seed+1000, tt.ecc)
			defer sim2.Close()
			defer ek2.Close()
			if _, err := ek2.Import(blobs[0]); err == nil {
				t.Fatal("another TPM imported the blob")
			}
		})
	}
}

func TestEnrollRefusesNonDefaultEK(t *testing.T) {
	sim, err := simulator.GetWithFixedSeedInsecure(7)
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	srk, err := client.StorageRootKeyECC(sim) // an ECC P-256 key, but not of the EK template
	if err != nil {
		t.Fatal(err)
	}
	defer srk.Close()
	e := initEnv(t, provider.Policy{})
	tok, err := e.p.CreateToken(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.p.Enroll(context.Background(), provider.EnrollRequest{Token: tok.Secret, CSR: newHost(t).csr, Hostname: "h", EKPublic: tpm2bPublic(t, srk)})
	if !errors.Is(err, provider.ErrBadRequest) || !strings.Contains(err.Error(), "default EK template") {
		t.Fatalf("Enroll with a non-EK template: %v, want ErrBadRequest", err)
	}
}
