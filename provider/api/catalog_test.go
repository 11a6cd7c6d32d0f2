package api_test

import (
	"context"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/client"
)

// TestCatalogOwnershipOverHTTP: host D can neither delete nor take over host C's
// catalog object (403 not_owner with a sentence), so an admin's retire of the version
// C's VM uses stays refused; D takes the VM over with MoveVM (audited) once it migrated,
// and then C is the one refused.
func TestCatalogOwnershipOverHTTP(t *testing.T) {
	ctx := context.Background()
	e := startReal(t)
	c, _, cID := e.join(t, "kvm-c")
	d, _, dID := e.join(t, "kvm-d")
	st, err := e.admin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v1 := st.KDKs[0]
	vm := uuid.NewString()
	obj := apiv1.Object{VMUUID: vm, Name: "vtpm", KeyID: uuid.NewString(), KDKID: v1.ID}
	if err := c.RegisterObject(ctx, obj); err != nil {
		t.Fatal(err)
	}
	if _, err := e.admin.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	stolen := obj
	stolen.KeyID = uuid.NewString()
	for name, do := range map[string]func() error{
		"DELETE another host's object":    func() error { return d.UnregisterObject(ctx, vm, "vtpm") },
		"POST over another host's object": func() error { return d.RegisterObject(ctx, stolen) },
	} {
		err := do()
		if !client.IsCode(err, apiv1.CodeNotOwner) || !strings.Contains(err.Error(), "403") || !strings.Contains(err.Error(), cID) {
			t.Fatalf("%s: %v, want 403 %s naming the owner %s", name, err, apiv1.CodeNotOwner, cID)
		}
	}
	if err := e.admin.Retire(ctx, v1.Version); !client.IsCode(err, apiv1.CodeInUse) {
		t.Fatalf("retire while host C's VM uses v%d: %v, want %s", v1.Version, err, apiv1.CodeInUse)
	}

	if _, err := d.MoveVM(ctx, uuid.NewString()); !client.IsCode(err, apiv1.CodeNotFound) {
		t.Fatalf("move of a VM the catalog does not hold: %v, want %s", err, apiv1.CodeNotFound)
	}
	moved, err := d.MoveVM(ctx, vm)
	if err != nil || len(moved) != 1 || moved[0].HostID != dID || moved[0].KeyID != obj.KeyID {
		t.Fatalf("MoveVM = %+v, %v; want host C's vtpm object, now host D's", moved, err)
	}
	recs, err := e.p.Audit(ctx, 1)
	if err != nil || recs[0].Kind != audit.KindMove || recs[0].Details["from_hosts"] != cID || recs[0].Actor != "host:"+dID {
		t.Fatalf("last audit record %+v, %v; want the move from host C by host D", recs, err)
	}
	if err := c.UnregisterObject(ctx, vm, "vtpm"); !client.IsCode(err, apiv1.CodeNotOwner) {
		t.Fatalf("old host deletes the moved object: %v, want %s", err, apiv1.CodeNotOwner)
	}
	if err := d.UnregisterObject(ctx, vm, "vtpm"); err != nil {
		t.Fatalf("new host deletes its object: %v", err)
	}
	if err := e.admin.Retire(ctx, v1.Version); err != nil {
		t.Fatalf("retire once no VM uses v%d: %v", v1.Version, err)
	}
}

// TestForgetOverHTTP: a host forgets its own objects of a VM in one DELETE and hears of
// another host's, which stay; the administrator forgets a lost host's objects only once
// that host is revoked (409 in_use before, naming the revoke); then the version retires.
func TestForgetOverHTTP(t *testing.T) {
	ctx := context.Background()
	e := startReal(t)
	c, _, cID := e.join(t, "kvm-c")
	d, _, dID := e.join(t, "kvm-d")
	st, err := e.admin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v1 := st.KDKs[0]
	gone, lost := uuid.NewString(), uuid.NewString()
	for _, r := range []struct {
		h  *client.Client
		vm string
		n  string
	}{{c, gone, "vtpm"}, {c, gone, "disk:vda"}, {d, lost, "vtpm"}} {
		if err := r.h.RegisterObject(ctx, apiv1.Object{VMUUID: r.vm, Name: r.n, KeyID: uuid.NewString(), KDKID: v1.ID}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.admin.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := d.ForgetVM(ctx, gone); err != nil || len(res.Removed) != 0 || len(res.Others) != 2 || res.Others[0].HostID != cID {
		t.Fatalf("host D forgets host C's VM: %+v, %v; want nothing removed, C's two objects listed", res, err)
	}
	if res, err := c.ForgetVM(ctx, gone); err != nil || len(res.Removed) != 2 || len(res.Others) != 0 {
		t.Fatalf("host C forgets its VM: %+v, %v; want both objects removed", res, err)
	}
	if _, err := c.ForgetVM(ctx, "not-a-uuid"); !client.IsCode(err, apiv1.CodeBadRequest) {
		t.Fatalf("forget of a malformed UUID: %v, want %s", err, apiv1.CodeBadRequest)
	}
	if _, err := e.admin.ForgetObjects(ctx, lost, ""); !client.IsCode(err, apiv1.CodeInUse) || !strings.Contains(err.Error(), "nkpctl provider revoke "+dID) {
		t.Fatalf("admin forgets a live host's objects: %v, want %s naming the revoke", err, apiv1.CodeInUse)
	}
	if err := e.admin.Retire(ctx, v1.Version); !client.IsCode(err, apiv1.CodeInUse) {
		t.Fatalf("retire while host D's VM uses v%d: %v, want %s", v1.Version, err, apiv1.CodeInUse)
	}
	if err := e.admin.Revoke(ctx, dID); err != nil {
		t.Fatal(err)
	}
	objs, err := e.admin.ForgetObjects(ctx, lost, "")
	if err != nil || len(objs) != 1 || objs[0].HostID != dID {
		t.Fatalf("admin forgets a revoked host's objects: %+v, %v", objs, err)
	}
	recs, err := e.p.Audit(ctx, 1)
	if err != nil || recs[0].Kind != audit.KindForget || !strings.HasPrefix(recs[0].Actor, "admin:") || recs[0].Details["host_id"] != dID {
		t.Fatalf("last audit record %+v, %v; want the admin's forget", recs, err)
	}
	if err := e.admin.Retire(ctx, v1.Version); err != nil {
		t.Fatalf("retire once no VM uses v%d: %v", v1.Version, err)
	}
}
