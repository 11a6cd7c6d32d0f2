package vm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/provider/apiv1"
)

// forgetEnv is a protected VM "f1" (uuid1) whose definition was then removed from
// libvirt (undefine false: still defined), with a kept original disk file recorded under
// its name.
func forgetEnv(t *testing.T, undefine bool) (*env, apiv1.Object, string) {
	t.Helper()
	e := newEnv(t)
	e.define(t, "f1", uuid1, "")
	if _, err := e.m.Protect(context.Background(), "f1"); err != nil {
		t.Fatal(err)
	}
	o, ok := e.cat.get(uuid1, domxml.ObjectVTPM)
	if !ok {
		t.Fatal("protect registered no vtpm object")
	}
	orig := filepath.Join(e.root, "f1.img")
	if err := os.WriteFile(orig, []byte("plaintext guest data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.m.keep(uuid1, kept{Target: "vda", Path: orig, ReplacedBy: orig + ".nkp-x.luks", Op: opProtect, Time: time.Now(), VM: "f1"}); err != nil {
		t.Fatal(err)
	}
	if undefine {
		e.lv.mu.Lock()
		delete(e.lv.doms, uuid1)
		e.lv.mu.Unlock()
	}
	return e, o, orig
}

// TestForget: forget refuses a defined domain, an unconfirmed request and an unreachable
// provider without changing anything; it resolves the UUID or the old name; it removes
// this host's catalog objects, the vTPM state, the kept files and the journal, and leaves
// another host's objects (a VM that migrated there).
func TestForget(t *testing.T) {
	cases := []struct {
		name     string
		domain   string
		defined  bool
		confirm  bool
		down     bool
		foreign  bool
		wantErr  error
		say      []string
		forgets  bool // state, kept file and journal gone
		inCat    bool // the vtpm object is still in the catalog afterwards
		unreg    int
		others   int
		prepare  func(t *testing.T, e *env)
		problems []string
	}{
		{name: "defined domain", domain: "f1", defined: true, confirm: true, wantErr: ErrDefined,
			say: []string{"nkpctl vm unprotect f1", "virsh undefine f1", uuid1}, inCat: true},
		{name: "not confirmed", domain: uuid1, wantErr: ErrNotConfirmed, say: []string{"--yes", "nothing can bring back", "catalog"}, inCat: true},
		{name: "provider down", domain: uuid1, confirm: true, down: true, wantErr: ErrUnavailable,
			say: []string{"nothing was changed on this host", "nkpctl vm forget " + uuid1 + " --yes again"}, inCat: true},
		{name: "unknown name", domain: "f2", confirm: true, wantErr: ErrNoDomain, say: []string{`"f2"`, "UUID"}, inCat: true},
		{name: "by UUID", domain: strings.ToUpper(uuid1), confirm: true, forgets: true, unreg: 1},
		{name: "by the name it had", domain: "f1", confirm: true, forgets: true, unreg: 1},
		{name: "migrated: another host owns its objects", domain: uuid1, confirm: true, foreign: true, forgets: true, inCat: true, others: 1},
		{name: "an interrupted protect", domain: "f1", confirm: true, forgets: true, unreg: 1,
			prepare: func(t *testing.T, e *env) {
				vdb := filepath.Join(e.root, "f1-vdb.img")
				if err := os.WriteFile(vdb, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := e.m.j.write(&entry{Op: opProtect, Domain: "f1", UUID: uuid1, Disks: []diskEntry{{Target: "vdb", Orig: vdb, New: "/nonexistent"}}}); err != nil {
					t.Fatal(err)
				}
			},
			problems: []string{"an interrupted protect of this VM was dropped", "f1-vdb.img"}},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			e, o, orig := forgetEnv(t, !tt.defined)
			if tt.prepare != nil {
				tt.prepare(t, e)
			}
			e.cat.down = tt.down
			if tt.foreign {
				e.cat.foreign = map[string]bool{uuid1: true}
			}
			dir := filepath.Join(e.m.cfg.VTPMDir, uuid1)
			hadJournal := e.m.j.exists(uuid1)
			f, err := e.m.Forget(ctx, tt.domain, tt.confirm)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Forget: %v, want %v", err, tt.wantErr)
				}
				for _, s := range tt.say {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("refusal %q does not say %q", err, s)
					}
				}
			} else if err != nil {
				t.Fatalf("Forget: %v", err)
			}
			_, serr := os.Stat(StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID))
			_, kerr := os.Stat(orig)
			_, inCat := e.cat.get(uuid1, domxml.ObjectVTPM)
			if inCat != tt.inCat {
				t.Errorf("vtpm object in the catalog: %v, want %v", inCat, tt.inCat)
			}
			if tt.forgets {
				if !errors.Is(serr, fs.ErrNotExist) || !errors.Is(kerr, fs.ErrNotExist) || e.m.j.exists(uuid1) {
					t.Fatalf("after forget: state %v, kept file %v, journal %v; want all gone", serr, kerr, e.m.j.exists(uuid1))
				}
				if _, err := os.Stat(e.m.keptPath(uuid1)); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("kept list left: %v", err)
				}
				if f.StateRemoved != dir || len(f.FilesRemoved) != 1 || len(f.Unregistered) != tt.unreg || len(f.OtherHosts) != tt.others || f.UUID != uuid1 {
					t.Errorf("Forgotten = %+v", f)
				}
				if tt.others > 0 && (f.OtherHosts[0].HostID != "h-other" || !strings.Contains(f.Note, "h-other")) {
					t.Errorf("other host's objects not named: %+v", f)
				}
				if v, ok := e.m.orphanVM(uuid1); ok {
					t.Errorf("status still reports the VM: %+v", v)
				}
				again, err := e.m.Forget(ctx, uuid1, true)
				if err != nil || !strings.Contains(again.Note, "nothing to forget") && tt.others == 0 {
					t.Errorf("forget again: %+v, %v; want nothing to forget", again, err)
				}
			} else {
				if serr != nil || kerr != nil || e.m.j.exists(uuid1) != hadJournal {
					t.Fatalf("after a refused forget: state %v, kept file %v, journal %v; want all kept", serr, kerr, e.m.j.exists(uuid1))
				}
			}
			for _, p := range tt.problems {
				if !strings.Contains(strings.Join(f.Problems, "\n"), p) {
					t.Errorf("problems %q do not say %q", f.Problems, p)
				}
			}
		})
	}
}

// TestForgetStatusAndAmbiguousName: status of the undefined VM names forget; two
// undefined VMs that had the same name are refused by name and listed by UUID.
func TestForgetStatusAndAmbiguousName(t *testing.T) {
	ctx := context.Background()
	e, _, _ := forgetEnv(t, true)
	v, err := e.m.Status(ctx, uuid1)
	if err != nil || !strings.Contains(strings.Join(v.Problems, "\n"), "nkpctl vm forget "+uuid1) {
		t.Fatalf("status of the undefined VM: %+v, %v; want a problem naming nkpctl vm forget", v, err)
	}
	const uuid2 = "6c1d7b2f-9a4e-4d3c-8b8f-2e3a4b5c6d7e"
	if err := e.m.keep(uuid2, kept{Target: "vda", Path: filepath.Join(e.root, "other.img"), Op: opProtect, VM: "f1"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.m.Forget(ctx, "f1", true)
	if !errors.Is(err, ErrBadArgument) || !strings.Contains(err.Error(), uuid1) || !strings.Contains(err.Error(), uuid2) {
		t.Fatalf("forget of an ambiguous name: %v, want both UUIDs named", err)
	}
}

// TestForgetCrash stops a forget after each of its steps (a panic from AfterStep, which
// unwinds like a crash leaves the files: every step is written and synced before it
// returns) and checks that hostd's start finishes it: catalog, state, kept file and
// journal all gone. If the VM is defined again before that, recovery keeps its state and
// registers its objects again instead.
func TestForgetCrash(t *testing.T) {
	for _, step := range []string{"journal", "catalog", "secrets", "kept", "state", "done"} {
		for _, redefine := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/redefined=%v", step, redefine), func(t *testing.T) {
				ctx := context.Background()
				e, o, orig := forgetEnv(t, false)
				x, err := e.lv.DomainXML(ctx, uuid1)
				if err != nil {
					t.Fatal(err)
				}
				e.lv.mu.Lock()
				delete(e.lv.doms, uuid1)
				e.lv.mu.Unlock()
				cfg := e.m.cfg
				crashForgetAt(t, cfg, step, func(m *Manager) { m.Forget(ctx, uuid1, true) })
				if redefine {
					if err := e.lv.DefineXML(ctx, x); err != nil {
						t.Fatal(err)
					}
				}
				m, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				if err := m.Recover(ctx); err != nil {
					t.Fatalf("Recover: %v", err)
				}
				if m.j.exists(uuid1) {
					t.Fatal("journal left after Recover")
				}
				_, serr := os.Stat(StateDir(cfg.VTPMDir, uuid1, o.KeyID))
				_, kerr := os.Stat(orig)
				c, inCat := e.cat.get(uuid1, domxml.ObjectVTPM)
				if !redefine || step == "done" {
					if inCat || !errors.Is(serr, fs.ErrNotExist) || !errors.Is(kerr, fs.ErrNotExist) {
						t.Fatalf("after recovery: catalog %v, state %v, kept file %v; want all gone", inCat, serr, kerr)
					}
					return
				}
				// Defined again: the catalog holds what the definition names, always.
				if !inCat || c.KeyID != o.KeyID {
					t.Fatalf("VM defined again: catalog %+v (%v), want its vtpm key %s", c, inCat, o.KeyID)
				}
				if step == "journal" || step == "catalog" || step == "secrets" || step == "kept" {
					if serr != nil {
						t.Fatalf("VM defined again before its state was removed: state %v, want kept", serr)
					}
				}
			})
		}
	}
}

// TestForgetHandler: forget over hostd's local API: a defined domain is refused with
// code "defined", an unconfirmed one with "confirm", one on a revoked host with
// "revoked", and a confirmed one answers what it removed.
func TestForgetHandler(t *testing.T) {
	e, _, _ := forgetEnv(t, false)
	c := serve(t, e)
	ctx := context.Background()
	if _, err := c.Forget(ctx, "f1", vmapi.ForgetRequest{Confirm: true}); !vmapi.IsCode(err, vmapi.CodeDefined) {
		t.Fatalf("forget of a defined domain: %v, want code %s", err, vmapi.CodeDefined)
	}
	e.lv.mu.Lock()
	delete(e.lv.doms, uuid1)
	e.lv.mu.Unlock()
	if _, err := c.Forget(ctx, "f1", vmapi.ForgetRequest{}); !vmapi.IsCode(err, vmapi.CodeConfirm) {
		t.Fatalf("unconfirmed forget: %v, want code %s", err, vmapi.CodeConfirm)
	}
	e.cat.down = true
	if _, err := c.Forget(ctx, "f1", vmapi.ForgetRequest{Confirm: true}); !vmapi.IsCode(err, vmapi.CodeUnavailable) {
		t.Fatalf("forget with the provider down: %v, want code %s", err, vmapi.CodeUnavailable)
	}
	e.cat.down, e.cat.revoked = false, true
	if _, err := c.Forget(ctx, "f1", vmapi.ForgetRequest{Confirm: true}); !vmapi.IsCode(err, vmapi.CodeRevoked) {
		t.Fatalf("forget on a revoked host: %v, want code %s", err, vmapi.CodeRevoked)
	}
	e.cat.revoked = false
	f, err := c.Forget(ctx, "f1", vmapi.ForgetRequest{Confirm: true})
	if err != nil || f.UUID != uuid1 || f.Domain != "f1" || len(f.Unregistered) != 1 || f.Unregistered[0].Name != domxml.ObjectVTPM || f.StateRemoved == "" {
		t.Fatalf("Forget = %+v, %v", f, err)
	}
}

// serve mounts e's Handler on a unix socket and returns a client for it.
func serve(t *testing.T, e *env) *vmapi.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "hostd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(vmapi.PathVMs, e.m.Handler())
	mux.Handle(vmapi.PathVMs+"/", e.m.Handler())
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return vmapi.NewClient(sock)
}

// TestClaim: a VM started here takes its catalog objects over from the host it came from
// (so that host's forget leaves them), unless it is not protected by this provider.
func TestClaim(t *testing.T) {
	for _, tt := range []struct {
		name     string
		provider string
		protect  bool
		moves    int
	}{
		{"protected here", "prov-a", true, 1},
		{"another provider's VM", "prov-b", true, 0},
		{"not protected", "prov-a", false, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t)
			e.define(t, "c1", uuid1, "")
			if tt.protect {
				if _, err := e.m.Protect(ctx, "c1"); err != nil {
					t.Fatal(err)
				}
			}
			e.keys.provider = tt.provider
			e.cat.foreign = map[string]bool{uuid1: true}
			if err := e.m.Claim(ctx, uuid1); err != nil {
				t.Fatalf("Claim: %v", err)
			}
			if e.cat.moves != tt.moves || e.cat.foreign[uuid1] == (tt.moves == 1) {
				t.Fatalf("MoveVM called %d times (foreign now %v), want %d", e.cat.moves, e.cat.foreign[uuid1], tt.moves)
			}
			e.cat.down = true
			if err := e.m.Claim(ctx, uuid1); tt.moves == 1 && err == nil {
				t.Fatal("Claim with the provider down: no error")
			}
		})
	}
}

// TestForgetLocalOnly: a host the provider revoked cannot forget a VM's catalog objects;
// the plain forget changes nothing and names --local-only and the administrator's
// command; forget --local-only never asks the provider, removes this host's side only
// when confirmed, and says which objects the catalog keeps; a later plain forget, once
// the provider accepts the host, removes those.
func TestForgetLocalOnly(t *testing.T) {
	cases := []struct {
		name      string
		req       vmapi.ForgetRequest
		domain    string
		noRecord  bool // the VM was protected by an older hostd: no record of its objects
		wantErr   error
		say       []string
		forgets   bool
		leftKDK   int // the KDK version the answer gives the vtpm left in the catalog
		thenAgain bool
	}{
		{name: "plain forget on a revoked host", req: vmapi.ForgetRequest{Confirm: true}, domain: "f1", wantErr: errCatalogUnchanged,
			say: []string{"nothing was changed on this host", "nkpctl vm forget " + uuid1 + " --local-only --yes", "nkpctl provider objects forget --vm " + uuid1 + " --yes"}},
		{name: "local-only, not confirmed", req: vmapi.ForgetRequest{LocalOnly: true}, domain: "f1", wantErr: ErrNotConfirmed,
			say: []string{"--local-only --yes", "leaves its objects in the provider's catalog"}},
		{name: "local-only by name", req: vmapi.ForgetRequest{Confirm: true, LocalOnly: true}, domain: "f1", forgets: true, leftKDK: 1, thenAgain: true},
		{name: "local-only by UUID, no record", req: vmapi.ForgetRequest{Confirm: true, LocalOnly: true}, domain: uuid1, noRecord: true, forgets: true},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			e, o, orig := forgetEnv(t, true)
			if tt.noRecord {
				if err := os.Remove(e.m.recordPath(uuid1)); err != nil {
					t.Fatal(err)
				}
			}
			e.cat.revoked = true
			f, err := e.m.ForgetWith(ctx, tt.domain, tt.req)
			_, serr := os.Stat(StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID))
			_, kerr := os.Stat(orig)
			_, inCat := e.cat.get(uuid1, domxml.ObjectVTPM)
			if !inCat {
				t.Fatal("the vtpm object left the catalog of a provider that revoked this host")
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("ForgetWith: %v, want %v", err, tt.wantErr)
				}
				for _, s := range tt.say {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("refusal %q does not say %q", err, s)
					}
				}
				if serr != nil || kerr != nil || e.m.j.exists(uuid1) {
					t.Fatalf("after a refused forget: state %v, kept file %v, journal %v; want state and file kept, no journal", serr, kerr, e.m.j.exists(uuid1))
				}
				return
			}
			if err != nil {
				t.Fatalf("ForgetWith: %v", err)
			}
			if e.cat.calls != 0 {
				t.Errorf("forget --local-only asked the provider %d times", e.cat.calls)
			}
			if !errors.Is(serr, fs.ErrNotExist) || !errors.Is(kerr, fs.ErrNotExist) || e.m.j.exists(uuid1) {
				t.Fatalf("after forget --local-only: state %v, kept file %v, journal %v; want all gone", serr, kerr, e.m.j.exists(uuid1))
			}
			if _, err := os.Stat(e.m.recordPath(uuid1)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("record left: %v", err)
			}
			if !f.LocalOnly || len(f.Unregistered) != 0 || len(f.LeftInCatalog) != 1 || f.LeftInCatalog[0].KeyID != o.KeyID || f.LeftInCatalog[0].KDKVersion != tt.leftKDK {
				t.Errorf("Forgotten = %+v; want local only, the vtpm key %s (KDK version %d) left in the catalog", f, o.KeyID, tt.leftKDK)
			}
			for _, s := range []string{"nkpctl provider objects forget --vm " + uuid1 + " --yes", "nkpctl vm forget " + uuid1 + " --yes", o.KeyID} {
				if !strings.Contains(f.Note, s) {
					t.Errorf("note %q does not say %q", f.Note, s)
				}
			}
			if tt.thenAgain {
				e.cat.revoked = false
				f, err := e.m.Forget(ctx, uuid1, true)
				if _, inCat := e.cat.get(uuid1, domxml.ObjectVTPM); err != nil || inCat || len(f.Unregistered) != 1 {
					t.Fatalf("plain forget after --local-only: %+v, %v, still in the catalog: %v; want the catalog's side removed", f, err, inCat)
				}
			}
		})
	}
}

// TestForgetLocalOnlyCrash: a forget --local-only stopped after each step is finished by
// hostd's start without asking the provider (it revoked this host), and leaves the
// catalog's objects.
func TestForgetLocalOnlyCrash(t *testing.T) {
	for _, step := range []string{"journal", "catalog", "secrets", "kept", "state"} {
		t.Run(step, func(t *testing.T) {
			ctx := context.Background()
			e, o, orig := forgetEnv(t, true)
			e.cat.revoked = true
			cfg := e.m.cfg
			crashForgetAt(t, cfg, step, func(m *Manager) {
				m.ForgetWith(ctx, "f1", vmapi.ForgetRequest{Confirm: true, LocalOnly: true})
			})
			m, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Recover(ctx); err != nil {
				t.Fatalf("Recover: %v", err)
			}
			_, serr := os.Stat(StateDir(cfg.VTPMDir, uuid1, o.KeyID))
			_, kerr := os.Stat(orig)
			_, inCat := e.cat.get(uuid1, domxml.ObjectVTPM)
			if m.j.exists(uuid1) || !errors.Is(serr, fs.ErrNotExist) || !errors.Is(kerr, fs.ErrNotExist) || !inCat || e.cat.calls != 0 {
				t.Fatalf("after recovery: journal %v, state %v, kept file %v, in the catalog %v, provider asked %d times; want the local side gone, the catalog untouched and not asked",
					m.j.exists(uuid1), serr, kerr, inCat, e.cat.calls)
			}
		})
	}
}

// crashForgetAt runs forget on a Manager made from cfg that panics right after the
// forget step named step (a panic unwinds like a crash leaves the files: every step is
// written and synced before it returns), and fails the test if the step is never reached.
func crashForgetAt(t *testing.T, cfg Config, step string, forget func(m *Manager)) {
	t.Helper()
	cfg.AfterStep = func(op, s string) {
		if op == opForget && s == step {
			panic("crash at " + s)
		}
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if r := recover(); r == nil {
			t.Fatalf("step %s never reached", step)
		}
	}()
	forget(m)
}
