package vm

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

// TestHandler drives the operations through vmapi's client over a unix socket, as
// nkpctl does, and checks that refusals arrive with their code and sentence.
func TestHandler(t *testing.T) {
	e := newEnv(t)
	e.define(t, "h1", uuid1, "")
	c := serve(t, e)
	ctx := context.Background()

	v, err := c.Protect(ctx, "h1")
	if err != nil || !v.Protected || v.Domain != "h1" || len(v.Objects) != 1 {
		t.Fatalf("Protect = %+v, %v", v, err)
	}
	key := v.Objects[0].KeyID
	if g, err := c.Get(ctx, uuid1); err != nil || g.Objects[0].KeyID != key {
		t.Fatalf("Get by UUID = %+v, %v", g, err)
	}
	if l, err := c.List(ctx); err != nil || len(l.VMs) != 1 || l.VMs[0].UUID != uuid1 {
		t.Fatalf("List = %+v, %v", l, err)
	}
	e.keys.primary, e.keys.known = 2, 2
	if v, err := c.Rekey(ctx, "h1"); err != nil || v.Objects[0].KDKVersion != 2 || v.Objects[0].KeyID == key {
		t.Fatalf("Rekey = %+v, %v", v, err)
	}
	refusals := []struct {
		call func() error
		code string
		say  string
	}{
		{func() error { _, err := c.Get(ctx, "nope"); return err }, vmapi.CodeNotFound, `vm "nope"`},
		{func() error { _, err := c.Protect(ctx, "h1"); return err }, vmapi.CodeAlreadyProtected, `vm "h1"`},
		{func() error { _, err := c.Unprotect(ctx, "h1", vmapi.UnprotectRequest{TPM: "perhaps"}); return err }, vmapi.CodeBadRequest, `"perhaps"`},
		{func() error {
			e.lv.active[uuid1] = true
			defer func() { e.lv.active[uuid1] = false }()
			_, err := c.Unprotect(ctx, "h1", vmapi.UnprotectRequest{})
			return err
		}, vmapi.CodeRunning, "virsh shutdown h1"},
	}
	for _, r := range refusals {
		err := r.call()
		if !vmapi.IsCode(err, r.code) || !strings.Contains(err.Error(), r.say) {
			t.Errorf("error %v: want code %s and %q", err, r.code, r.say)
		}
	}
	if v, err := c.Unprotect(ctx, "h1", vmapi.UnprotectRequest{TPM: vmapi.UnprotectKeep}); err != nil || v.Protected {
		t.Fatalf("Unprotect = %+v, %v", v, err)
	}
	if _, err := vmapi.NewClient(filepath.Join(t.TempDir(), "none.sock")).List(ctx); err == nil || !strings.Contains(err.Error(), "is nkp-hostd running?") {
		t.Fatalf("no hostd: %v", err)
	}
}

// TestHandlerStream protects a VM's disks through vmapi's client with progress streamed
// as NDJSON, then checks that a refusal in a streamed answer keeps its code.
func TestHandlerStream(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "h2", uuid1, diskDevices(dir))
	c := serve(t, e)
	ctx := context.Background()
	var got []vmapi.Progress
	v, err := c.ProtectWith(ctx, "h2", vmapi.ProtectRequest{Disks: "vda"}, func(p vmapi.Progress) { got = append(got, p) })
	if err != nil || !v.Protected || !v.Disks[0].Protected || v.Disks[1].Protected {
		t.Fatalf("ProtectWith = %+v, %v", v, err)
	}
	if len(got) < 2 || got[0].Disk != "vda" || got[len(got)-1].Phase != "done" {
		t.Fatalf("progress %+v", got)
	}
	_, err = c.ProtectWith(ctx, "h2", vmapi.ProtectRequest{Disks: "vda"}, func(vmapi.Progress) {})
	if !vmapi.IsCode(err, vmapi.CodeAlreadyProtected) {
		t.Fatalf("streamed refusal: %v", err)
	}
	_, err = c.ProtectWith(ctx, "h2", vmapi.ProtectRequest{Disks: "vdz"}, nil)
	if !vmapi.IsCode(err, vmapi.CodeBadRequest) || !strings.Contains(err.Error(), `"vdz"`) {
		t.Fatalf("unknown disk: %v", err)
	}
	if v, err := c.Finalize(ctx, "h2"); err != nil || !strings.Contains(v.Note, dir+"/vda.img") {
		t.Fatalf("Finalize = %+v, %v", v, err)
	}
}
