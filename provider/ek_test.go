package provider

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"testing"

	"github.com/google/go-tpm-tools/server"
)

func TestParseEK(t *testing.T) {
	ecc, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	pkix := func(k any) []byte {
		b, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	area, err := server.CreateEKPublicAreaFromKey(&ecc.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	tpmt, err := area.Encode()
	if err != nil {
		t.Fatal(err)
	}
	tpm2b := append([]byte{byte(len(tpmt) >> 8), byte(len(tpmt))}, tpmt...)
	tests := []struct {
		name string
		in   []byte
		ok   bool
	}{
		{"ECC P-256 PKIX", pkix(&ecc.PublicKey), true},
		{"ECC P-256 TPMT_PUBLIC", tpmt, true},
		{"ECC P-256 TPM2B_PUBLIC", tpm2b, true},
		{"ECC P-384 PKIX", pkix(&p384.PublicKey), false},
		{"RSA 1024 PKIX", pkix(&rsa1024.PublicKey), false},
		{"empty", nil, false},
		{"garbage", []byte("garbage"), false},
		{"TPM2B with a wrong size", append([]byte{0xff, 0xff}, tpmt...), false},
		{"too long", make([]byte, maxEKBytes+1), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, der, err := parseEK(tt.in)
			if !tt.ok {
				if !errors.Is(err, ErrBadRequest) {
					t.Fatalf("parseEK: %v, want ErrBadRequest", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !ecc.PublicKey.Equal(key) || string(der) != string(pkix(&ecc.PublicKey)) {
				t.Fatal("parseEK returned another key")
			}
		})
	}
}

// FuzzParseEK feeds arbitrary bytes (what a host sends as its EK) to the EK parser: an
// accepted EK must wrap an import blob.
func FuzzParseEK(f *testing.F) {
	f.Add([]byte{0x00, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		key, der, err := parseEK(data)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error does not wrap ErrBadRequest: %v", err)
			}
			return
		}
		if len(der) == 0 {
			t.Fatal("accepted EK without PKIX form")
		}
		if _, err := server.CreateImportBlob(key, make([]byte, 32), nil); err != nil {
			t.Fatalf("accepted EK cannot wrap an import blob: %v", err)
		}
	})
}
