package provider_test

import (
	"context"
	"errors"
	"testing"

	"github.com/nkp-dev/nkp/provider/store/mem"
	"github.com/nkp-dev/nkp/provider/store/storetest"
)

// TestCAStoreFailure: CA and CAHash read the store under the caller's context and report
// its failure; they never hand out a nil certificate or an empty pin as if all were well
// (x509.CertPool.AddCert(nil) panics in the caller).
func TestCAStoreFailure(t *testing.T) {
	ctx := context.Background()
	st := &storetest.FailStore{Store: mem.New()}
	e := initOn(t, st)
	if c, err := e.p.CA(ctx); c == nil || err != nil {
		t.Fatalf("CA = %v, %v", c, err)
	}
	injected := errors.New("injected: store unreachable")
	st.Inject(injected)
	if c, err := e.p.CA(ctx); c != nil || !errors.Is(err, injected) {
		t.Fatalf("CA with a failing store = %v, %v; want nil and the store's error", c, err)
	}
	if h, err := e.p.CAHash(ctx); h != "" || !errors.Is(err, injected) {
		t.Fatalf("CAHash with a failing store = %q, %v; want \"\" and the store's error", h, err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	st.Inject(nil)
	if _, err := e.p.CA(cancelled); !errors.Is(err, context.Canceled) {
		t.Fatalf("CA with a cancelled context = %v, want context.Canceled", err)
	}
}
