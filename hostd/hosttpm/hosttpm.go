// Package hosttpm is hostd's use of the host TPM: the endorsement key (ECC P-256, the
// default template the provider accepts) whose public part `nkp-hostd join` registers,
// and unwrapping the provider's import blobs (go-tpm-tools' server.CreateImportBlob,
// sent as a proto-marshalled pb.ImportBlob) with it. Only the TPM whose EK the blob was
// made for can unwrap it.
//
// The TPM itself is opened elsewhere (internal/tpmdev: /dev/tpmrm0 or a socket TPM; tests
// pass go-tpm-tools' simulator). Importers: hostd, cmd/nkp-hostd, tests. No cgo.
package hosttpm

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"
)

// ErrUnwrap is wrapped when the TPM refuses a blob (made for another TPM, or damaged).
var ErrUnwrap = errors.New("the host TPM cannot unwrap the KDK blob")

// TPM is an open host TPM with its endorsement key loaded. Safe for concurrent use
// (commands are serialised).
type TPM struct {
	mu     sync.Mutex
	rw     io.ReadWriter
	closer io.Closer
	ek     *client.Key
}

// New loads the endorsement key of the TPM behind rw; Close closes closer (may be nil).
func New(rw io.ReadWriter, closer io.Closer) (*TPM, error) {
	ek, err := client.EndorsementKeyECC(rw)
	if err != nil {
		return nil, fmt.Errorf("host TPM: loading the endorsement key (ECC P-256): %w", err)
	}
	return &TPM{rw: rw, closer: closer, ek: ek}, nil
}

// EKPublic is the endorsement key's public part, PKIX DER (what join registers).
func (t *TPM) EKPublic() ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(t.ek.PublicKey())
	if err != nil {
		return nil, fmt.Errorf("host TPM: endorsement key: %w", err)
	}
	return der, nil
}

// Unwrap returns the secret in an import blob. The caller wipes it.
func (t *TPM) Unwrap(blob []byte) ([]byte, error) {
	var ib pb.ImportBlob
	if err := proto.Unmarshal(blob, &ib); err != nil {
		return nil, fmt.Errorf("%w: the blob does not parse: %v", ErrUnwrap, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	out, err := t.ek.Import(&ib)
	if err != nil {
		return nil, fmt.Errorf("%w (was it made for this host's TPM?): %v", ErrUnwrap, err)
	}
	return out, nil
}

// Close flushes the endorsement key and closes the TPM.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ek.Close()
	if t.closer != nil {
		return t.closer.Close()
	}
	return nil
}
