package vm

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/provider/kdk"
)

type fakeCache struct {
	primary kdkcache.Version
	has     bool
}

func (f fakeCache) Primary() (kdkcache.Version, bool) { return f.primary, f.has }

func (f fakeCache) Key(v int) ([]byte, string, error) {
	if v != 1 {
		return nil, "", errors.New("KDK version 2 is not cached")
	}
	return kdkBytes(1), kdkID(1), nil
}

func TestCacheKeys(t *testing.T) {
	ctx := context.Background()
	want, _ := kdk.Derive(kdkBytes(1), kdk.PurposeVTPM, uuid1, "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71")
	tests := []struct {
		name    string
		cache   fakeCache
		derive  KDK
		wantErr string
	}{
		{"derives", fakeCache{kdkcache.Version{ID: kdkID(1), Version: 1, Primary: true}, true}, KDK{kdkID(1), 1}, ""},
		{"ID mismatch", fakeCache{kdkcache.Version{ID: kdkID(1), Version: 1}, true}, KDK{kdkID(7), 1}, "not " + kdkID(7)},
		{"unknown version", fakeCache{}, KDK{kdkID(2), 2}, "not cached"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := CacheKeys(tt.cache, "prov-a")
			b, err := k.Derive(ctx, tt.derive, kdk.PurposeVTPM, uuid1, "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(b, want) {
				t.Fatalf("Derive = %x, %v", b, err)
			}
		})
	}
	if _, err := CacheKeys(fakeCache{}, "p").Primary(ctx); err == nil {
		t.Fatal("Primary of an empty cache succeeded")
	}
	if _, err := CacheKeys(fakeCache{kdkcache.Version{ID: kdkID(1), Version: 1, Err: "TPM refused the blob"}, true}, "p").Primary(ctx); err == nil || !strings.Contains(err.Error(), "TPM refused") {
		t.Fatalf("unusable primary: %v", err)
	}
	if p, err := CacheKeys(fakeCache{kdkcache.Version{ID: kdkID(1), Version: 1}, true}, "p").Primary(ctx); err != nil || p != (KDK{kdkID(1), 1}) {
		t.Fatalf("Primary = %+v, %v", p, err)
	}
}
