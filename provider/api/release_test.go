package api_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/client"
)

// TestPollUnchanged: against the real provider, GET /v1/host/kdks?known=KEYSET answers
// Unchanged with no keys and no audit record while the host's key set is current, hands
// out the keys (audited) once a rotation is backed up, and still refuses a revoked host.
func TestPollUnchanged(t *testing.T) {
	ctx := context.Background()
	e := startReal(t)
	host, _, hostID := e.join(t, "kvm-poll")
	backup := func() {
		sum := sha256.New()
		if _, err := e.admin.Backup(ctx, sum, []byte("api test: correct horse battery")); err != nil {
			t.Fatal(err)
		}
		if _, err := e.admin.ConfirmBackup(ctx, hex.EncodeToString(sum.Sum(nil))); err != nil {
			t.Fatal(err)
		}
	}
	backup()
	first, err := host.Release(ctx)
	if err != nil || len(first.KDKs) != 1 || first.KeySet == "" || first.Unchanged {
		t.Fatalf("first release: %+v, %v", first, err)
	}
	head := func() audit.Record {
		recs, err := e.p.Audit(ctx, 1)
		if err != nil {
			t.Fatal(err)
		}
		return recs[0]
	}
	if r := head(); r.Kind != audit.KindRelease || r.Subject != hostID {
		t.Fatalf("last audit record %+v, want the release", r)
	}
	seq := head().Seq
	for range 3 {
		poll, err := host.ReleaseChanged(ctx, first.KeySet)
		if err != nil || !poll.Unchanged || len(poll.KDKs) != 0 || poll.KeySet != first.KeySet {
			t.Fatalf("poll with the current key set: %+v, %v; want Unchanged and no keys", poll, err)
		}
	}
	if head().Seq != seq {
		t.Fatal("a poll that handed out no keys was audited")
	}
	if stale, err := host.ReleaseChanged(ctx, "0123456789abcdef0123456789abcdef"); err != nil || stale.Unchanged || len(stale.KDKs) != 1 {
		t.Fatalf("poll with a stale key set: %+v, %v; want the keys", stale, err)
	}
	if _, err := e.admin.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := host.ReleaseChanged(ctx, first.KeySet); !client.IsCode(err, apiv1.CodeNotBackedUp) {
		t.Fatalf("poll after a rotation not backed up: %v, want %s", err, apiv1.CodeNotBackedUp)
	}
	backup()
	next, err := host.ReleaseChanged(ctx, first.KeySet)
	if err != nil || next.Unchanged || len(next.KDKs) != 2 || next.KeySet == first.KeySet {
		t.Fatalf("poll after a backed-up rotation: %+v, %v; want both versions and a new key set", next, err)
	}
	if err := e.admin.Revoke(ctx, hostID); err != nil {
		t.Fatal(err)
	}
	if _, err := host.ReleaseChanged(ctx, next.KeySet); !client.IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("poll by a revoked host: %v, want %s", err, apiv1.CodeHostRevoked)
	}
}
