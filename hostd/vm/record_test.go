package vm

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/provider/apiv1"
)

const uuid2 = "6c1d7b2f-9a4e-4d3c-8b8f-2e3a4b5c6d7e"

// undefine removes VM u from the fake libvirt (virsh undefine).
func (e *env) undefine(u string) {
	e.lv.mu.Lock()
	delete(e.lv.doms, u)
	e.lv.mu.Unlock()
}

// rename gives VM u the name to (virsh domrename).
func (e *env) rename(t *testing.T, u, from, to string) {
	t.Helper()
	x, err := e.lv.DomainXML(context.Background(), u)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.lv.DefineXML(context.Background(), bytes.Replace(x, []byte("<name>"+from+"</name>"), []byte("<name>"+to+"</name>"), 1)); err != nil {
		t.Fatal(err)
	}
}

// protectR1 defines VM r1 (uuid1), protects it and returns its vTPM object in the
// catalog.
func (e *env) protectR1(t *testing.T) apiv1.Object {
	t.Helper()
	e.define(t, "r1", uuid1, "")
	if _, err := e.m.Protect(context.Background(), "r1"); err != nil {
		t.Fatal(err)
	}
	o, _ := e.cat.get(uuid1, domxml.ObjectVTPM)
	return o
}

// TestForgetByRecordedName: a VM with a vTPM only (no kept disk file, no journal) is
// forgotten by the name it had once libvirt no longer defines it: protect records the
// name, status and a start (Claim) record a new one after a rename, and recovery at
// hostd's start records the VMs an older hostd protected. Two undefined VMs that had one
// name are refused by that name, listing both UUIDs.
func TestForgetByRecordedName(t *testing.T) {
	cases := []struct {
		name   string
		before func(t *testing.T, e *env) // after protect, before undefine
		forget string
		want   error
	}{
		{name: "the name protect recorded", forget: "r1"},
		{name: "renamed, then status", forget: "r2", before: func(t *testing.T, e *env) {
			e.rename(t, uuid1, "r1", "r2")
			if _, err := e.m.Status(context.Background(), "r2"); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "renamed, then started here", forget: "r2", before: func(t *testing.T, e *env) {
			e.rename(t, uuid1, "r1", "r2")
			if err := e.m.Claim(context.Background(), uuid1); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "renamed, never seen since: the old name", forget: "r1", before: func(t *testing.T, e *env) {
			e.rename(t, uuid1, "r1", "r2")
		}},
		{name: "protected by an older hostd: recorded at start", forget: "r1", before: func(t *testing.T, e *env) {
			if err := os.Remove(e.m.recordPath(uuid1)); err != nil {
				t.Fatal(err)
			}
			if err := e.m.Recover(context.Background()); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "protected by an older hostd, undefined before the new one started", forget: "r1", want: ErrNoDomain, before: func(t *testing.T, e *env) {
			if err := os.Remove(e.m.recordPath(uuid1)); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "two undefined VMs had the name", forget: "r1", want: ErrBadArgument, before: func(t *testing.T, e *env) {
			e.define(t, "r1", uuid2, "")
			if _, err := e.m.Protect(context.Background(), uuid2); err != nil {
				t.Fatal(err)
			}
			e.undefine(uuid2)
		}},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t)
			o := e.protectR1(t)
			if r, err := e.m.readRecord(uuid1); err != nil || r == nil || r.Name != "r1" || len(r.Objects) != 1 || r.Objects[0].KeyID != o.KeyID {
				t.Fatalf("record after protect: %+v, %v; want name r1 and the vtpm object %+v", r, err, o)
			}
			if tt.before != nil {
				tt.before(t, e)
			}
			e.undefine(uuid1)
			if _, err := os.Stat(e.m.keptPath(uuid1)); !errors.Is(err, fs.ErrNotExist) || e.m.j.exists(uuid1) {
				t.Fatalf("the VM has kept files (%v) or a journal (%v): not a vTPM-only VM", err, e.m.j.exists(uuid1))
			}
			f, err := e.m.Forget(ctx, tt.forget, true)
			dir := StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID)
			_, serr := os.Stat(dir)
			_, inCat := e.cat.get(uuid1, domxml.ObjectVTPM)
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("Forget(%q): %v, want %v", tt.forget, err, tt.want)
				}
				if errors.Is(tt.want, ErrBadArgument) && (!strings.Contains(err.Error(), uuid1) || !strings.Contains(err.Error(), uuid2) || !strings.Contains(err.Error(), "vTPM state")) {
					t.Errorf("the refusal of an ambiguous name does not list both UUIDs and what nkp keeps of them: %v", err)
				}
				if serr != nil || !inCat {
					t.Fatalf("after a refused forget: state %v, in the catalog %v; want both kept", serr, inCat)
				}
				return
			}
			if err != nil {
				t.Fatalf("Forget(%q): %v", tt.forget, err)
			}
			if f.UUID != uuid1 || f.Domain != tt.forget || len(f.Unregistered) != 1 || !errors.Is(serr, fs.ErrNotExist) || inCat {
				t.Fatalf("Forget(%q) = %+v; state %v, in the catalog %v; want VM %s forgotten", tt.forget, f, serr, inCat, uuid1)
			}
			if _, err := os.Stat(e.m.recordPath(uuid1)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("record left after forget: %v", err)
			}
		})
	}
}

// TestRecordFollowsOperations: the record holds the objects after rekey, goes with
// unprotect, and the status of the undefined VM by its recorded name reports its state.
func TestRecordFollowsOperations(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.protectR1(t)
	e.keys.primary, e.keys.known = 2, 2
	if _, err := e.m.Rekey(ctx, "r1"); err != nil {
		t.Fatal(err)
	}
	r, err := e.m.readRecord(uuid1)
	if err != nil || r == nil || len(r.Objects) != 1 || r.Objects[0].KDKVersion != 2 {
		t.Fatalf("record after rekey: %+v, %v; want the vtpm object on KDK version 2", r, err)
	}
	x, err := e.lv.DomainXML(ctx, uuid1)
	if err != nil {
		t.Fatal(err)
	}
	e.undefine(uuid1)
	v, err := e.m.Status(ctx, "r1")
	if err != nil || v.UUID != uuid1 || !strings.Contains(strings.Join(v.Problems, "\n"), "nkpctl vm forget "+uuid1) {
		t.Fatalf("status of the undefined VM by its recorded name: %+v, %v", v, err)
	}
	if err := e.lv.DefineXML(ctx, x); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Unprotect(ctx, "r1", "none"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.m.recordPath(uuid1)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("record left after unprotect: %v", err)
	}
}

// TestStatusRecordOnly: a VM that libvirt no longer defines and of which nkp keeps
// nothing on this host but its record (its disks finalized, its vTPM state gone) still
// has objects in the catalog that hold back their KDK version's retire: status by its
// recorded name and the list report it with the forget command, and forget by that name
// clears it from both.
func TestStatusRecordOnly(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	o := e.protectR1(t)
	e.undefine(uuid1)
	if err := os.RemoveAll(filepath.Join(e.m.cfg.VTPMDir, uuid1)); err != nil {
		t.Fatal(err)
	}
	v, err := e.m.Status(ctx, "r1")
	if err != nil || v.UUID != uuid1 {
		t.Fatalf("status of the record-only VM by its recorded name: %+v, %v", v, err)
	}
	p := strings.Join(v.Problems, "\n")
	for _, want := range []string{"nkpctl vm forget r1", o.KeyID, "catalog", uuid1} {
		if !strings.Contains(p, want) {
			t.Errorf("status problems %q do not name %q", p, want)
		}
	}
	if v2, err := e.m.Status(ctx, uuid1); err != nil || strings.Join(v2.Problems, "\n") != p {
		t.Errorf("status by UUID: %+v, %v; want the same problems as by name", v2, err)
	}
	list, err := e.m.List(ctx)
	if err != nil || len(list) != 1 || list[0].UUID != uuid1 {
		t.Fatalf("List = %+v, %v; want the record-only VM %s", list, err, uuid1)
	}
	if _, err := e.m.Forget(ctx, "r1", true); err != nil {
		t.Fatalf("Forget(r1): %v", err)
	}
	if _, inCat := e.cat.get(uuid1, domxml.ObjectVTPM); inCat {
		t.Error("the object is still in the catalog after forget")
	}
	if list, err := e.m.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("List after forget = %+v, %v; want nothing", list, err)
	}
	if _, err := e.m.Status(ctx, "r1"); !errors.Is(err, ErrNoDomain) {
		t.Errorf("status after forget: %v; want %v", err, ErrNoDomain)
	}
}
