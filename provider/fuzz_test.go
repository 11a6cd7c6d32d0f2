package provider_test

import (
	"context"
	"errors"
	"testing"

	"github.com/nkp-dev/nkp/provider"
)

// FuzzEnroll sends arbitrary enrollment requests (the token, hostname, CSR and EK come
// from the network) to a provider: each is refused with one of the documented errors, or
// enrolls a host that then authorizes.
func FuzzEnroll(f *testing.F) {
	e := initEnv(f, provider.Policy{})
	tok, err := e.p.CreateToken(context.Background(), provider.MaxTokenTTL)
	if err != nil {
		f.Fatal(err)
	}
	h := newHost(f)
	f.Add(tok.Secret, "kvm-01", h.csr, []byte(nil))
	f.Add("00000000-0000-0000-0000-000000000000.x", "h", []byte{0x30, 0x00}, []byte{0x00, 0x01})
	f.Fuzz(func(t *testing.T, token, hostname string, csr, ek []byte) {
		resp, err := e.p.Enroll(context.Background(), provider.EnrollRequest{Token: token, CSR: csr, Hostname: hostname, EKPublic: ek})
		if err != nil {
			for _, s := range []error{provider.ErrTokenInvalid, provider.ErrTokenUsed, provider.ErrTokenExpired, provider.ErrBadRequest, provider.ErrTPMRequired} {
				if errors.Is(err, s) {
					return
				}
			}
			t.Fatalf("Enroll error wraps no documented sentinel: %v", err)
		}
		if resp.HostID == "" || len(resp.Certificate) == 0 {
			t.Fatalf("Enroll succeeded without a host: %+v", resp)
		}
	})
}
