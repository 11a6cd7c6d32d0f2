package hostd

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nkp-dev/nkp/hostd/disksecret"
	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/lifecycle"
	"github.com/nkp-dev/nkp/hostd/virt"
	"github.com/nkp-dev/nkp/hostd/vm"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
)

// startGrace: a vTPM started this recently before libvirt was asked about its domain
// may belong to a start in progress; reconcile leaves it alone (the release hook, or the
// next reconcile, handles it).
const startGrace = 5 * time.Second

// vmKeys is the KDK cache as hostd/vm uses it.
type vmKeys struct{ d *Daemon }

func (k vmKeys) ProviderID() string {
	k.d.mu.Lock()
	defer k.d.mu.Unlock()
	if k.d.id.info.ProviderID != "" {
		return k.d.id.info.ProviderID
	}
	return providerIDOf(k.d.id.ca)
}

func (k vmKeys) Primary(context.Context) (vm.KDK, error) {
	if why := k.d.notReady(); why != "" {
		return vm.KDK{}, errors.New(why)
	}
	p, _ := k.d.cache.Primary()
	if p.Err != "" {
		return vm.KDK{}, fmt.Errorf("primary KDK version %d: %s", p.Version, p.Err)
	}
	return vm.KDK{ID: p.ID, Version: p.Version}, nil
}

func (k vmKeys) Derive(_ context.Context, v vm.KDK, purpose, vmUUID, keyID string) ([]byte, error) {
	key, id, err := k.d.cache.Key(v.Version)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if id != v.ID {
		return nil, fmt.Errorf("KDK version %d is %s on this host, not %s", v.Version, id, v.ID)
	}
	return kdk.Derive(key, purpose, vmUUID, keyID)
}

// lateHandler serves 503 until the VM operations are mounted (libvirt connected).
type lateHandler struct{ h atomic.Pointer[http.Handler] }

func (l *lateHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h := l.h.Load(); h != nil {
		(*h).ServeHTTP(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusServiceUnavailable)
	w.Write([]byte(`{"error":"nkp-hostd is not connected to libvirt yet: check that libvirtd runs (and nkp-hostd's --libvirt)"}` + "\n"))
}

// runLibvirt connects to libvirt (retrying while libvirtd is down), mounts the VM
// operations, recovers interrupted ones, and reconciles vTPMs with libvirt's events.
func (d *Daemon) runLibvirt(ctx context.Context) error {
	var conn *virt.Conn
	for delay := 200 * time.Millisecond; ; delay = min(delay*2, 10*time.Second) {
		var err error
		if conn, err = virt.Open(ctx, d.cfg.LibvirtURI, d.log); err == nil {
			break
		}
		d.log.Warn("libvirt not reachable yet; hooks are answered meanwhile, VM operations wait", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
	}
	defer conn.Close()
	secrets, err := disksecret.New(disksecret.Config{Libvirt: conn, Keys: diskKeys{d}, Log: d.log,
		Disks: diskImage, Verify: imageVerifier{&qemuimg.Tool{Logger: d.log}}})
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait() // before conn.Close
	wg.Add(1)
	go func() {
		defer wg.Done()
		secrets.Run(ctx)
	}()
	d.secrets.Store(secrets)
	owner := &vm.Owner{UID: d.cfg.vtpmCred.uid, GID: d.cfg.vtpmCred.gid}
	var setup *vm.SwtpmSetup
	if d.cfg.SwtpmSetup != SwtpmSetupNone {
		setup = &vm.SwtpmSetup{Program: d.cfg.SwtpmSetup, VTPM: d.cfg.SwtpmBinary}
	}
	m, err := vm.New(vm.Config{
		Keys: vmKeys{d}, Libvirt: conn, Catalog: d.pc, Secrets: secrets,
		VTPMDir: filepath.Join(d.cfg.StateDir, dirVTPM), JournalDir: filepath.Join(d.cfg.StateDir, dirJournal),
		SocketDir: filepath.Join(d.cfg.RunDir, "vtpm"), VTPMOwner: owner, SwtpmOwner: owner, Setup: setup, Log: d.log,
		ProbeVTPM: d.sup.Probe,
	})
	if err != nil {
		return err
	}
	if err := m.Recover(ctx); err != nil {
		d.log.Error("recovering interrupted VM operations failed; they are retried before the next operation on those VMs", "err", err)
	}
	h := m.Handler()
	d.vmAPI.h.Store(&h)
	tick := time.NewTicker(d.cfg.SyncInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			d.reconcileAll(ctx, conn)
			secrets.RequestAll()
		case ev := <-conn.Events():
			switch ev.Kind {
			case virt.Reconnected:
				secrets.RequestAll()
				d.reconcileAll(ctx, conn)
			case virt.Disconnected:
				secrets.Disconnected()
			case virt.Started:
				d.reconcile(ctx, conn, ev.UUID)
				wg.Add(1)
				go func() {
					defer wg.Done()
					d.claim(ctx, m, ev.UUID)
				}()
			case virt.Stopped:
				d.reconcile(ctx, conn, ev.UUID)
				secrets.RequestVM(ev.UUID) // a stopped VM may leave a rekey's old key unused
			case virt.Defined, virt.Undefined:
				secrets.RequestVM(ev.UUID)
			case virt.SecretChanged, virt.SecretUndefined:
				secrets.SecretEvent(ev.UUID)
			}
		}
	}
}

func (d *Daemon) reconcileAll(ctx context.Context, conn *virt.Conn) {
	for _, inst := range d.sup.List() {
		d.reconcile(ctx, conn, inst.UUID)
	}
}

// reconcile compares one VM's vTPM with libvirt's view. libvirt is asked before the VM's
// lock is taken: a hook of that VM may hold the lock while libvirtd holds the domain.
func (d *Daemon) reconcile(ctx context.Context, conn *virt.Conn, uuid string) {
	asked := time.Now()
	st, err := conn.DomainState(ctx, uuid)
	if err != nil {
		d.log.Warn("reconcile: libvirt did not answer", "uuid", uuid, "err", err)
		return
	}
	hasVTPM := false
	if st.XML != nil {
		if dom, err := domxml.Parse(st.XML); err == nil && dom.Metadata != nil {
			_, hasVTPM = dom.Metadata.Object(domxml.ObjectVTPM)
		}
	}
	defer d.vmLocks.lock(uuid)()
	inst, running := d.sup.Get(uuid)
	if running && inst.Started.After(asked.Add(-startGrace)) {
		return
	}
	plan := lifecycle.Reconcile(lifecycle.Domain{Known: st.Known, Active: st.Active, HasVTPM: hasVTPM, Running: running})
	if plan.Note != "" {
		d.log.Warn(plan.Note, "uuid", uuid, "vm", inst.Name)
	}
	if plan.Stop {
		if err := d.sup.Stop(ctx, uuid); err != nil {
			d.log.Error("reconcile: stopping a vTPM failed", "uuid", uuid, "err", err)
		}
	}
}

// claim makes this host the owner of a started VM's catalog objects (vm.Manager.Claim),
// off the event loop, trying again a few times while the provider does not answer: a
// forget of the VM on the host it came from then leaves its objects alone.
func (d *Daemon) claim(ctx context.Context, m *vm.Manager, uuid string) {
	delay := 5 * time.Second
	for attempt := 1; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := m.Claim(cctx, uuid)
		cancel()
		if err == nil {
			return
		}
		if attempt == 4 || ctx.Err() != nil {
			d.log.Warn("claiming a started VM's catalog objects for this host failed: the catalog may still name the host it came from as their owner, until its next rekey or unprotect here", "uuid", uuid, "err", err)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay *= 3
	}
}
