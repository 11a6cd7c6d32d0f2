package provider

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/binary"
	"fmt"

	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/legacy/tpm2"
)

// maxEKBytes bounds the EK public a host may send.
const maxEKBytes = 2048

// parseEK reads a host TPM's endorsement key public part, sent as PKIX DER, TPM2B_PUBLIC
// or TPMT_PUBLIC, and checks that it is a key of the default EK templates (what
// server.CreateImportBlob wraps for). It returns the key and its PKIX DER form.
func parseEK(b []byte) (crypto.PublicKey, []byte, error) {
	if len(b) == 0 || len(b) > maxEKBytes {
		return nil, nil, fmt.Errorf("EK public of %d bytes: want 1 to %d: %w", len(b), maxEKBytes, ErrBadRequest)
	}
	key, tpmPub, err := decodeEK(b)
	if err != nil {
		return nil, nil, fmt.Errorf("EK public: %w: %w", ErrBadRequest, err)
	}
	if k, ok := key.(*ecdsa.PublicKey); ok {
		if k.Curve != elliptic.P256() {
			return nil, nil, fmt.Errorf("EK public: %w: ECC curve %s; the default EK template is NIST P-256", ErrBadRequest, k.Curve.Params().Name)
		}
		if _, err := k.ECDH(); err != nil { // go-tpm-tools panics on a point off the curve
			return nil, nil, fmt.Errorf("EK public: %w: %w", ErrBadRequest, err)
		}
	}
	area, err := server.CreateEKPublicAreaFromKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("EK public: %w: not an RSA-2048 or ECC P-256 endorsement key (%v)", ErrBadRequest, err)
	}
	if tpmPub != nil {
		// The import blob is bound to the EK's name, which covers its whole public area:
		// a key from another template would be refused by the host's TPM at import.
		want, err := area.Encode()
		if err != nil {
			return nil, nil, fmt.Errorf("EK public: encoding the default template: %w", err)
		}
		got, err := tpmPub.Encode()
		if err != nil || !bytes.Equal(want, got) {
			return nil, nil, fmt.Errorf("EK public: %w: the EK does not use the default EK template (TCG EK Credential Profile, "+
				"as go-tpm-tools client.EndorsementKeyRSA/ECC create it); import blobs for it would not import", ErrBadRequest)
		}
	}
	// Wrap a dummy secret once: what Release will do, so a key that parses but cannot be
	// used (an even RSA modulus, an ECC point off the curve) is refused here.
	if err := tryImportBlob(key); err != nil {
		return nil, nil, fmt.Errorf("EK public: %w: the key cannot wrap an import blob (%v)", ErrBadRequest, err)
	}
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("EK public: %w: %w", ErrBadRequest, err)
	}
	return key, der, nil
}

// decodeEK tries PKIX DER, then TPM2B_PUBLIC (size-prefixed), then TPMT_PUBLIC.
func decodeEK(b []byte) (crypto.PublicKey, *tpm2.Public, error) {
	if k, err := x509.ParsePKIXPublicKey(b); err == nil {
		return k, nil, nil
	}
	body := b
	if len(b) >= 2 && int(binary.BigEndian.Uint16(b)) == len(b)-2 {
		body = b[2:]
	}
	pub, err := tpm2.DecodePublic(body)
	if err != nil {
		return nil, nil, fmt.Errorf("neither PKIX DER nor a TPM2B_PUBLIC: %w", err)
	}
	k, err := pub.Key()
	if err != nil {
		return nil, nil, fmt.Errorf("TPM public area holds no usable key: %w", err)
	}
	return k, &pub, nil
}

// tryImportBlob wraps a dummy secret for key, turning a panic inside go-tpm-tools (it
// trusts its input) into an error.
func tryImportBlob(key crypto.PublicKey) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("go-tpm-tools panicked: %v", r)
		}
	}()
	_, err = server.CreateImportBlob(key, make([]byte, KDKSize), nil)
	return err
}
