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

// TestForget: a host forgets only its own objects of a VM (another host's stay, and keep
// their version from being retired); an administrator forgets the objects of a revoked
// host, never those of a live one; after both, the old KDK version can be retired.
func TestForget(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	e.backup(t, "p: correct horse battery")
	a, b := e.enroll(t, "kvm-a", nil), e.enroll(t, "kvm-b", nil)
	st, err := e.p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v1 := st.Primary()
	gone, moved, lost := uuid.NewString(), uuid.NewString(), uuid.NewString()
	reg := func(h, vm, name string) {
		t.Helper()
		if err := e.p.RegisterObject(ctx, h, provider.Object{VMUUID: vm, Name: name, KeyID: uuid.NewString(), KDKID: v1.ID}); err != nil {
			t.Fatal(err)
		}
	}
	reg(a.id, gone, "vtpm")
	reg(a.id, gone, "disk:vda")
	reg(a.id, moved, "vtpm")
	reg(b.id, lost, "vtpm")
	reg(b.id, lost, "disk:vda")
	reg(b.id, lost, "disk:vdb")
	if _, err := e.p.MoveVM(ctx, b.id, moved); err != nil { // moved migrated from A to B
		t.Fatal(err)
	}
	if _, err := e.p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	e.backup(t, "p: correct horse battery")

	hostCases := []struct {
		name          string
		host, vm      string
		removed, kept int
		err           error
	}{
		{"own VM", a.id, gone, 2, 0, nil},
		{"again (a rerun after a crash)", a.id, gone, 0, 0, nil},
		{"VM moved to another host", a.id, moved, 0, 1, nil},
		{"bad UUID", a.id, "vm-1", 0, 0, provider.ErrBadRequest},
	}
	for _, tt := range hostCases {
		t.Run("host/"+tt.name, func(t *testing.T) {
			res, err := e.p.ForgetVM(ctx, tt.host, tt.vm)
			if !errors.Is(err, tt.err) || (tt.err == nil) != (err == nil) {
				t.Fatalf("ForgetVM: %v, want %v", err, tt.err)
			}
			if len(res.Removed) != tt.removed || len(res.Others) != tt.kept {
				t.Fatalf("ForgetVM: removed %d, others %d (%+v); want %d, %d", len(res.Removed), len(res.Others), res, tt.removed, tt.kept)
			}
			for _, o := range res.Others {
				if o.HostID != b.id {
					t.Fatalf("other object %+v, want host B's", o)
				}
			}
		})
	}
	if recs, err := e.p.Audit(ctx, 3); err != nil {
		t.Fatal(err)
	} else if r := recs[len(recs)-1]; r.Kind != audit.KindUnregister || r.Actor != "host:"+a.id || !strings.HasPrefix(r.Subject, gone+"/") || r.Details["via"] != "forget" {
		t.Fatalf("audit record of the host's forget: %+v", r)
	}
	if err := e.p.Retire(ctx, v1.Version); !errors.Is(err, provider.ErrInUse) {
		t.Fatalf("retire while host B's VMs use the version: %v, want ErrInUse", err)
	}

	// Host B is lost: the administrator may forget its objects only once it is revoked.
	actx := provider.WithActor(ctx, "alice")
	if _, err := e.p.ForgetObjects(actx, lost, ""); !errors.Is(err, provider.ErrInUse) || !strings.Contains(err.Error(), "nkpctl provider revoke "+b.id) {
		t.Fatalf("forget of a live host's objects: %v, want ErrInUse naming the revoke", err)
	}
	if objs, _ := e.p.Objects(ctx, provider.ObjectFilter{VMUUID: lost}); len(objs) != 3 {
		t.Fatalf("a refused forget removed objects: %+v", objs)
	}
	if err := e.p.Revoke(ctx, b.id); err != nil {
		t.Fatal(err)
	}
	adminCases := []struct {
		name    string
		vm, obj string
		want    []string
		err     error
	}{
		{"one object", lost, "disk:vdb", []string{"disk:vdb"}, nil},
		{"the same again", lost, "disk:vdb", nil, provider.ErrNotFound},
		{"bad object name", lost, "disk:VDA/..", nil, provider.ErrBadRequest},
		{"bad UUID", "x", "", nil, provider.ErrBadRequest},
		{"the rest", strings.ToUpper(lost), "", []string{"disk:vda", "vtpm"}, nil},
		{"the moved VM", moved, "", []string{"vtpm"}, nil},
		{"unknown VM", uuid.NewString(), "", nil, provider.ErrNotFound},
	}
	for _, tt := range adminCases {
		t.Run("admin/"+tt.name, func(t *testing.T) {
			objs, err := e.p.ForgetObjects(actx, tt.vm, tt.obj)
			if !errors.Is(err, tt.err) || (tt.err == nil) != (err == nil) {
				t.Fatalf("ForgetObjects: %v, want %v", err, tt.err)
			}
			var names []string
			for _, o := range objs {
				names = append(names, o.Name)
			}
			if strings.Join(names, ",") != strings.Join(tt.want, ",") {
				t.Fatalf("ForgetObjects removed %v, want %v", names, tt.want)
			}
		})
	}
	recs, err := e.p.Audit(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if r := recs[0]; r.Kind != audit.KindForget || r.Actor != "alice" || r.Subject != moved+"/vtpm" || r.Details["host_id"] != b.id || r.Details["host"] != "revoked" {
		t.Fatalf("audit record of the admin's forget: %+v", r)
	}
	if err := e.p.Retire(ctx, v1.Version); err != nil {
		t.Fatalf("retire once no object uses the version: %v", err)
	}
}
