package provider_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
)

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	if _, err := e.p.Status(ctx); !errors.Is(err, provider.ErrNotInitialized) {
		t.Fatalf("Status before init: %v, want ErrNotInitialized", err)
	}
	if c, err := e.p.CA(ctx); c != nil || !errors.Is(err, provider.ErrNotInitialized) {
		t.Fatalf("CA before init = %v, %v; want nil, ErrNotInitialized", c, err)
	}
	if h, err := e.p.CAHash(ctx); h != "" || !errors.Is(err, provider.ErrNotInitialized) {
		t.Fatalf("CAHash before init = %q, %v; want \"\", ErrNotInitialized", h, err)
	}
	st, err := e.p.Init(ctx, provider.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.State != provider.StateNotBackedUp || len(st.KDKs) != 1 || st.KDKs[0].Version != 1 || !st.KDKs[0].Primary || st.ProviderID == "" {
		t.Fatalf("status after init: %+v", st)
	}
	if _, err := e.p.Init(ctx, provider.InitOptions{}); !errors.Is(err, provider.ErrNotEmpty) {
		t.Fatalf("second Init: %v, want ErrNotEmpty", err)
	}
	if h := e.caHash(t); !strings.HasPrefix(h, "sha256:") {
		t.Fatalf("CAHash %q", h)
	}

	h := e.enroll(t, "kvm-01", nil)
	if got, err := e.p.AuthorizeHost(ctx, h.cert); err != nil || got.ID != h.id || got.Hostname != "kvm-01" || got.TPM() {
		t.Fatalf("AuthorizeHost = %+v, %v", got, err)
	}

	// Release refused before backup, with a sentence saying to take one.
	_, err = e.p.Release(ctx, h.id)
	if !errors.Is(err, provider.ErrNotBackedUp) || !strings.Contains(err.Error(), "take a backup first") {
		t.Fatalf("Release before backup: %v", err)
	}

	archive1 := e.backup(t, "pass one: correct horse battery")
	st, _ = e.p.Status(ctx)
	if st.State != provider.StateActive || st.LastBackup.IsZero() || st.Hosts != 1 || !st.KDKs[0].BackedUp {
		t.Fatalf("status after backup: %+v", st)
	}
	rel, err := e.p.Release(ctx, h.id)
	if err != nil {
		t.Fatal(err)
	}
	if len(rel) != 1 || len(rel[0].Bare) != provider.KDKSize || rel[0].ImportBlob != nil || !rel[0].Primary || rel[0].Version != 1 {
		t.Fatalf("release: %+v", rel)
	}
	kdk1 := bytes.Clone(rel[0].Bare)

	// Rotate: NotBackedUp again until the next backup, then both versions are released.
	v2, err := e.p.Rotate(ctx)
	if err != nil || v2.Version != 2 || !v2.Primary {
		t.Fatalf("Rotate = %+v, %v", v2, err)
	}
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, provider.ErrNotBackedUp) {
		t.Fatalf("Release after rotate: %v, want ErrNotBackedUp", err)
	}
	e.backup(t, "pass two: correct horse battery")
	rel, err = e.p.Release(ctx, h.id)
	if err != nil || len(rel) != 2 || rel[0].Version != 1 || rel[0].Primary || rel[1].Version != 2 || !rel[1].Primary {
		t.Fatalf("release after rotate and backup: %+v, %v", rel, err)
	}
	if !bytes.Equal(rel[0].Bare, kdk1) || bytes.Equal(rel[1].Bare, kdk1) {
		t.Fatal("KDK version 1 changed, or version 2 equals it")
	}
	kdk2 := bytes.Clone(rel[1].Bare)

	// Catalog and retire.
	vm := uuid.NewString()
	disk := provider.Object{VMUUID: vm, Name: "disk:vda", KeyID: uuid.NewString(), KDKID: st.KDKs[0].ID}
	vtpm := provider.Object{VMUUID: vm, Name: "vtpm", KeyID: uuid.NewString(), KDKID: v2.ID}
	for _, o := range []provider.Object{disk, vtpm} {
		if err := e.p.RegisterObject(ctx, h.id, o); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.p.Retire(ctx, 1); !errors.Is(err, provider.ErrInUse) || !strings.Contains(err.Error(), vm) {
		t.Fatalf("Retire of a version in use: %v, want ErrInUse naming the VM", err)
	}
	if err := e.p.Retire(ctx, 2); !errors.Is(err, provider.ErrInUse) {
		t.Fatalf("Retire of the primary: %v, want ErrInUse", err)
	}
	if err := e.p.Retire(ctx, 9); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("Retire of an unknown version: %v, want ErrNotFound", err)
	}
	objs, err := e.p.Objects(ctx, provider.ObjectFilter{KDKVersion: 1})
	if err != nil || len(objs) != 1 || objs[0].Name != "disk:vda" || objs[0].HostID != h.id {
		t.Fatalf("Objects(v1) = %+v, %v", objs, err)
	}
	objs, err = e.p.Objects(ctx, provider.ObjectFilter{VMUUID: vm})
	if err != nil || len(objs) != 2 {
		t.Fatalf("Objects(vm) = %+v, %v", objs, err)
	}
	// Shallow rekey: the disk now derives from version 2.
	disk.KDKID, disk.KeyID = v2.ID, uuid.NewString()
	if err := e.p.RegisterObject(ctx, h.id, disk); err != nil {
		t.Fatal(err)
	}
	if err := e.p.Retire(ctx, 1); err != nil {
		t.Fatalf("Retire after rekey: %v", err)
	}
	rel, err = e.p.Release(ctx, h.id)
	if err != nil || len(rel) != 1 || rel[0].Version != 2 || !bytes.Equal(rel[0].Bare, kdk2) {
		t.Fatalf("release after retire: %+v, %v", rel, err)
	}
	if err := e.p.RegisterObject(ctx, h.id, provider.Object{VMUUID: vm, Name: "disk:vdb", KeyID: uuid.NewString(), KDKID: st.KDKs[0].ID}); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("register with a retired KDK: %v, want ErrNotFound", err)
	}

	// The old archive still restores the retired version (into another provider).
	r := newEnv(t)
	if _, err := r.p.Restore(ctx, bytes.NewReader(archive1), []byte("pass one: correct horse battery"), false); err != nil {
		t.Fatal(err)
	}

	// Audit: every action recorded, chain intact, and no key in any log line.
	if err := e.p.AuditVerify(ctx); err != nil {
		t.Fatal(err)
	}
	recs, err := e.p.Audit(ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[audit.Kind]int{}
	for _, rec := range recs {
		kinds[rec.Kind]++
	}
	want := map[audit.Kind]int{audit.KindInit: 1, audit.KindToken: 1, audit.KindEnroll: 1, audit.KindBackup: 4, // two backups, each written + confirmed
		audit.KindRelease: 3, audit.KindRotate: 1, audit.KindRetire: 1, audit.KindRegister: 3}
	for k, n := range want {
		if kinds[k] != n {
			t.Errorf("audit has %d %s records, want %d (all: %v)", kinds[k], k, n, kinds)
		}
	}
	logs := e.logs.String()
	if !strings.Contains(logs, `"kind":"release"`) {
		t.Fatal("audit events are not in the structured log")
	}
	assertNoSecret(t, logs, kdk1)
	assertNoSecret(t, logs, kdk2)
}

func TestPolicy(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm-01", nil)
	e.backup(t, "p: correct horse battery")
	if _, err := e.p.Release(ctx, h.id); err != nil {
		t.Fatal(err)
	}
	if err := e.p.SetPolicy(ctx, provider.Policy{TPMRequired: true}); err != nil {
		t.Fatal(err)
	}
	if pol, err := e.p.Policy(ctx); err != nil || !pol.TPMRequired {
		t.Fatalf("Policy = %+v, %v", pol, err)
	}
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, provider.ErrTPMRequired) {
		t.Fatalf("bare release under tpm-required: %v, want ErrTPMRequired", err)
	}
	tok, err := e.p.CreateToken(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	h2 := newHost(t)
	if _, err := e.p.Enroll(ctx, provider.EnrollRequest{Token: tok.Secret, CSR: h2.csr, Hostname: "kvm-02"}); !errors.Is(err, provider.ErrTPMRequired) {
		t.Fatalf("enroll without EK under tpm-required: %v, want ErrTPMRequired", err)
	}
	if err := e.p.SetPolicy(ctx, provider.Policy{}); err != nil {
		t.Fatal(err)
	}
	// The refused enrollment left the token unused.
	if _, err := e.p.Enroll(ctx, provider.EnrollRequest{Token: tok.Secret, CSR: h2.csr, Hostname: "kvm-02"}); err != nil {
		t.Fatalf("enroll with the token after the policy is off: %v", err)
	}
}

func TestRevokeOnOtherReplica(t *testing.T) {
	ctx := context.Background()
	a := initEnv(t, provider.Policy{})
	b := open(t, a.st, a.rk, a.clock) // a second replica over the same store
	h := a.enroll(t, "kvm-01", nil)
	a.backup(t, "p: correct horse battery")
	if _, err := b.p.AuthorizeHost(ctx, h.cert); err != nil {
		t.Fatalf("replica b: %v", err)
	}
	if _, err := b.p.Release(ctx, h.id); err != nil {
		t.Fatalf("replica b release: %v", err)
	}
	if err := a.p.Revoke(ctx, h.id); err != nil {
		t.Fatal(err)
	}
	if _, err := b.p.AuthorizeHost(ctx, h.cert); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("replica b after revoke on a: %v, want ErrHostRevoked", err)
	}
	if _, err := b.p.Release(ctx, h.id); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("replica b release after revoke: %v, want ErrHostRevoked", err)
	}
	if err := a.p.Revoke(ctx, uuid.NewString()); !errors.Is(err, provider.ErrHostUnknown) {
		t.Fatalf("revoke of an unknown host: %v, want ErrHostUnknown", err)
	}
	hosts, err := b.p.Hosts(ctx)
	if err != nil || len(hosts) != 1 || hosts[0].Revoked.IsZero() {
		t.Fatalf("Hosts = %+v, %v", hosts, err)
	}
}

// TestForcedRestoreSeenByOtherReplica: a replica that cached the CA of the replaced
// provider follows a forced restore made on another replica without a restart.
func TestForcedRestoreSeenByOtherReplica(t *testing.T) {
	ctx := context.Background()
	src := initEnv(t, provider.Policy{})
	h := src.enroll(t, "kvm", nil)
	archive := src.backup(t, "p: correct horse battery")

	a := initEnv(t, provider.Policy{})
	b := open(t, a.st, a.rk, a.clock)
	old := b.caHash(t) // b caches the replaced provider's CA
	if _, err := a.p.Restore(ctx, bytes.NewReader(archive), []byte("p: correct horse battery"), true); err != nil {
		t.Fatal(err)
	}
	if got, want := b.caHash(t), src.caHash(t); got == old || got != want {
		t.Fatalf("replica b CA hash %s after the restore, want %s", got, want)
	}
	if _, err := b.p.AuthorizeHost(ctx, h.cert); err != nil {
		t.Fatalf("replica b refuses a host of the restored provider: %v", err)
	}
	if _, err := b.p.Release(ctx, h.id); err != nil {
		t.Fatalf("replica b release after the restore: %v", err)
	}
}

func TestRegisterObjectRefusals(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm", nil)
	st, _ := e.p.Status(ctx)
	kdk := st.KDKs[0].ID
	vm, key := uuid.NewString(), uuid.NewString()
	tests := []struct {
		name string
		host string
		obj  provider.Object
		want error
	}{
		{"upper-case UUIDs", h.id, provider.Object{VMUUID: strings.ToUpper(vm), Name: "vtpm", KeyID: strings.ToUpper(key), KDKID: strings.ToUpper(kdk)}, nil},
		{"bad VM UUID", h.id, provider.Object{VMUUID: "vm-1", Name: "vtpm", KeyID: key, KDKID: kdk}, provider.ErrBadRequest},
		{"bad name", h.id, provider.Object{VMUUID: vm, Name: "disk:../x", KeyID: key, KDKID: kdk}, provider.ErrBadRequest},
		{"empty disk target", h.id, provider.Object{VMUUID: vm, Name: "disk:", KeyID: key, KDKID: kdk}, provider.ErrBadRequest},
		{"bad key ID", h.id, provider.Object{VMUUID: vm, Name: "vtpm", KeyID: "k", KDKID: kdk}, provider.ErrBadRequest},
		{"unknown KDK", h.id, provider.Object{VMUUID: vm, Name: "vtpm", KeyID: key, KDKID: uuid.NewString()}, provider.ErrNotFound},
		{"unknown host", uuid.NewString(), provider.Object{VMUUID: vm, Name: "vtpm", KeyID: key, KDKID: kdk}, provider.ErrHostUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := e.p.RegisterObject(ctx, tt.host, tt.obj)
			if !errors.Is(err, tt.want) {
				t.Fatalf("RegisterObject: %v, want %v", err, tt.want)
			}
		})
	}
	objs, err := e.p.Objects(ctx, provider.ObjectFilter{VMUUID: strings.ToUpper(vm)})
	if err != nil || len(objs) != 1 || objs[0].KeyID != key || objs[0].KDKVersion != 1 {
		t.Fatalf("Objects = %+v, %v", objs, err)
	}
	if err := e.p.UnregisterObject(ctx, h.id, vm, "vtpm"); err != nil {
		t.Fatal(err)
	}
	if err := e.p.UnregisterObject(ctx, h.id, vm, "vtpm"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("second UnregisterObject: %v, want ErrNotFound", err)
	}
}
