package provider_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
)

// TestCatalogOwnership: a host changes only its own catalog objects. Another host's
// delete or re-register is refused with ErrNotOwner and a sentence naming the owner and
// the way out, so retire stays refused while the owner's VM still uses the version; the
// new host of a migrated VM takes its objects over with MoveVM (audited), only for a VM
// the catalog holds, and only while enrolled.
func TestCatalogOwnership(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	e.backup(t, "p: correct horse battery")
	c, d := e.enroll(t, "kvm-c", nil), e.enroll(t, "kvm-d", nil)
	st, err := e.p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v1 := st.Primary()
	vm := uuid.NewString()
	vtpm := provider.Object{VMUUID: vm, Name: "vtpm", KeyID: uuid.NewString(), KDKID: v1.ID}
	disk := provider.Object{VMUUID: vm, Name: "disk:vda", KeyID: uuid.NewString(), KDKID: v1.ID}
	for _, o := range []provider.Object{vtpm, disk} {
		if err := e.p.RegisterObject(ctx, c.id, o); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	e.backup(t, "p: correct horse battery")

	takeOver := vtpm
	takeOver.KeyID = uuid.NewString()
	refusals := []struct {
		name string
		do   func() error
	}{
		{"delete another host's object", func() error { return e.p.UnregisterObject(ctx, d.id, vm, "vtpm") }},
		{"register over another host's object", func() error { return e.p.RegisterObject(ctx, d.id, takeOver) }},
		{"register the same key over another host's object", func() error { return e.p.RegisterObject(ctx, d.id, vtpm) }},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do()
			if !errors.Is(err, provider.ErrNotOwner) {
				t.Fatalf("%v, want ErrNotOwner", err)
			}
			for _, want := range []string{c.id, "MoveVM"} {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("refusal %q does not name %q", err, want)
				}
			}
		})
	}
	objs, err := e.p.Objects(ctx, provider.ObjectFilter{VMUUID: vm})
	if err != nil || len(objs) != 2 || objs[0].HostID != c.id || objs[1].HostID != c.id || objs[1].KeyID != vtpm.KeyID {
		t.Fatalf("catalog after refused changes: %+v, %v; want both objects of host C unchanged", objs, err)
	}
	if err := e.p.Retire(ctx, v1.Version); !errors.Is(err, provider.ErrInUse) {
		t.Fatalf("retire while host C's VM uses the version: %v, want ErrInUse", err)
	}

	// The VM migrates from C to D: D moves it, then may change its objects; C may not.
	if _, err := e.p.MoveVM(ctx, d.id, uuid.NewString()); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("move of a VM the catalog does not hold: %v, want ErrNotFound", err)
	}
	moved, err := e.p.MoveVM(ctx, d.id, strings.ToUpper(vm))
	if err != nil {
		t.Fatal(err)
	}
	if len(moved) != 2 || moved[0].HostID != d.id || moved[1].HostID != d.id {
		t.Fatalf("MoveVM returned %+v, want both objects on host D", moved)
	}
	recs, err := e.p.Audit(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if r := recs[0]; r.Kind != audit.KindMove || r.Actor != "host:"+d.id || r.Subject != vm || r.Details["from_hosts"] != c.id || r.Details["objects"] != "disk:vda,vtpm" {
		t.Fatalf("audit record of the move: %+v", r)
	}
	if _, err := e.p.MoveVM(ctx, d.id, vm); err != nil {
		t.Fatalf("moving again: %v", err)
	}
	if recs2, _ := e.p.Audit(ctx, 1); recs2[0].Seq != recs[0].Seq {
		t.Fatalf("a repeated move was recorded again: %+v", recs2[0])
	}
	if err := e.p.UnregisterObject(ctx, c.id, vm, "disk:vda"); !errors.Is(err, provider.ErrNotOwner) {
		t.Fatalf("old host deletes a moved object: %v, want ErrNotOwner", err)
	}
	if err := e.p.UnregisterObject(ctx, d.id, vm, "disk:vda"); err != nil {
		t.Fatalf("new host deletes its object: %v", err)
	}
	if err := e.p.Revoke(ctx, c.id); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.MoveVM(ctx, c.id, vm); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("move by a revoked host: %v, want ErrHostRevoked", err)
	}
	if err := e.p.Retire(ctx, v1.Version); !errors.Is(err, provider.ErrInUse) {
		t.Fatalf("retire while host D's VM uses the version: %v, want ErrInUse", err)
	}
}
