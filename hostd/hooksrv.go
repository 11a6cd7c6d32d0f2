package hostd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
	"github.com/nkp-dev/nkp/hostd/disksecret"
	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/hostd/lifecycle"
	"github.com/nkp-dev/nkp/hostd/vtpm"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// serveHooks accepts hook connections until the listener closes.
func (d *Daemon) serveHooks(ctx context.Context) error {
	for {
		c, err := d.hookLn.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of file descriptors: transient; the hook waits and retries its dial.
				d.log.Error("hook server: out of file descriptors", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return err
		}
		go d.serveHook(ctx, c)
	}
}

func (d *Daemon) serveHook(ctx context.Context, c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(d.cfg.HookTimeout + 5*time.Second))
	// Either framing: the binary one of this release's hook, or JSON from a hook of the
	// last release (during an upgrade); the reply goes back in the request's.
	req, framing, err := hookproto.ReadRequestAny(bufio.NewReader(c))
	if err != nil {
		d.log.Warn("hook request refused", "err", err)
		hookproto.WriteReplyIn(c, framing, hookproto.Reply{Version: hookproto.Version, Message: "nkp: nkp-hostd could not read the hook's request (" + err.Error() + "): install nkp-hook and nkp-hostd from the same release"})
		return
	}
	start := time.Now()
	hctx, cancel := context.WithTimeout(ctx, d.cfg.HookTimeout)
	reply := d.Hook(hctx, req)
	cancel()
	result := "allow"
	if !reply.Allow {
		result = "refuse"
	}
	d.metrics.hookSeconds.WithLabelValues(metricOp(req.Op), result).Observe(time.Since(start).Seconds())
	if err := hookproto.WriteReplyIn(c, framing, reply); err != nil {
		d.log.Warn("hook reply not delivered", "domain", req.Domain, "op", req.Op, "err", err)
	}
}

func metricOp(op string) string {
	switch op {
	case hookproto.OpPrepare, hookproto.OpStart, hookproto.OpStarted, hookproto.OpStopped, hookproto.OpRelease,
		hookproto.OpMigrate, hookproto.OpRestore, hookproto.OpReconnect, hookproto.OpAttach:
		return op
	}
	return "other"
}

func allow(msg string) hookproto.Reply {
	return hookproto.Reply{Version: hookproto.Version, Allow: true, Message: msg}
}

func refuse(format string, a ...any) hookproto.Reply {
	return hookproto.Reply{Version: hookproto.Version, Message: "nkp: " + fmt.Sprintf(format, a...)}
}

// Hook answers one libvirt hook call. It never calls libvirt: the domain XML in the
// request is all it reads.
func (d *Daemon) Hook(ctx context.Context, req hookproto.Request) hookproto.Reply {
	dom, err := domxml.Parse([]byte(req.XML))
	if err != nil {
		if !hookproto.Required(req.Op) {
			d.log.Warn("hook: unreadable domain XML", "domain", req.Domain, "op", req.Op, "err", err)
			return allow("")
		}
		return refuse("VM %q: its domain XML cannot be read (%v): fix the domain definition (virsh edit %s)", req.Domain, err, req.Domain)
	}
	if dom.Metadata == nil {
		return allow("") // mentions nkp's namespace but carries no metadata of ours
	}
	if disks := disksecret.DiskObjects(dom.Metadata); len(disks) > 0 {
		switch req.Op {
		case hookproto.OpPrepare, hookproto.OpRestore, hookproto.OpMigrate:
			if r, ok := d.checkDisks(ctx, req, dom, disks); !ok {
				d.log.Warn("hook refused", "domain", dom.Name, "uuid", dom.UUID, "op", req.Op, "reason", r.Message)
				return r
			}
		case hookproto.OpRelease:
			// QEMU wrote to the images: verified again in the background now, so that the
			// next prepare finds them as verified (a stat) instead of verifying inline.
			if m := d.secrets.Load(); m != nil {
				m.Reverify(dom.UUID)
			}
		}
	}
	obj, hasVTPM := dom.Metadata.Object(domxml.ObjectVTPM)
	defer d.vmLocks.lock(dom.UUID)()
	// A vTPM that prepare launched is waited for here: at the start hook, just before
	// QEMU runs, it must serve (its start overlapped libvirt's work in between).
	_, werr := d.sup.Wait(ctx, dom.UUID)
	running := werr == nil
	plan := lifecycle.Decide(lifecycle.Hook{Op: req.Op, SubOp: req.SubOp, HasVTPM: hasVTPM, Running: running})
	log := d.log.With("domain", dom.Name, "uuid", dom.UUID, "op", req.Op, "sub_op", req.SubOp)
	if plan.Note != "" {
		log.Warn(plan.Note)
	}
	if plan.Stop {
		if err := d.sup.Stop(ctx, dom.UUID); err != nil && !errors.Is(err, vtpm.ErrNotRunning) {
			log.Error("stopping the vTPM failed", "err", err)
			if plan.Start {
				return refuse("VM %q: the vTPM of an earlier run (key %s) cannot be stopped (%v): stop it (see nkp-hostd's log) and start the VM again", dom.Name, obj.KeyID, err)
			}
		}
	}
	if plan.Refuse == lifecycle.NotRunning {
		if werr != nil && !errors.Is(werr, vtpm.ErrNotRunning) {
			return refuse("VM %q: its vTPM (key %s) did not start: %v", dom.Name, obj.KeyID, werr)
		}
		return refuse("VM %q: its vTPM (key %s) ended after prepare; see nkp-hostd's log and %s.log, then start the VM again", dom.Name, obj.KeyID, d.sup.StateDir(dom.UUID, obj.KeyID))
	}
	if !plan.Check && !plan.Start {
		return allow("")
	}
	if plan.Start {
		if r, ok := d.checkTPMDevice(dom, obj); !ok {
			return r
		}
	}
	keys, r, ok := d.vtpmKeys(dom, obj)
	if !ok {
		log.Warn("hook refused", "key_id", obj.KeyID, "kdk_version", obj.KDKVersion, "reason", r.Message)
		return r
	}
	defer keys.Wipe()
	if plan.Start {
		// Launched, not awaited: the start hook waits for it (and refuses with the reason
		// if it did not start), so the prepare hook does not hold libvirtd's worker for
		// nkp-swtpm's start.
		if err := d.sup.Launch(vtpm.VM{UUID: dom.UUID, Name: dom.Name, KeyID: obj.KeyID, KDKVersion: obj.KDKVersion}, keys); err != nil {
			return refuse("VM %q: its vTPM (key %s) did not start: %v", dom.Name, obj.KeyID, err)
		}
		log.Info("vTPM launched for QEMU", "key_id", obj.KeyID, "kdk_version", obj.KDKVersion, "socket", d.sup.SocketPath(dom.UUID))
	}
	return allow(d.offlineWarning(dom.Name, obj.KDKVersion))
}

// checkTPMDevice: the domain's <tpm> must be nkp's external backend on this VM's socket.
func (d *Daemon) checkTPMDevice(dom *domxml.Domain, obj domxml.Object) (hookproto.Reply, bool) {
	want := d.sup.SocketPath(dom.UUID)
	t, err := dom.TPM()
	switch {
	case err != nil:
		return refuse("VM %q (vTPM key %s): %v", dom.Name, obj.KeyID, err), false
	case t == nil:
		return refuse("VM %q has nkp metadata for a vTPM (key %s) but no <tpm> device: run `nkpctl vm protect %s` again", dom.Name, obj.KeyID, dom.Name), false
	case t.Backend != domxml.BackendExternal || t.SocketPath != want:
		return refuse("VM %q (vTPM key %s): its <tpm> uses backend %q at %q, not nkp's socket %s on this host: run `nkpctl vm protect %s` again", dom.Name, obj.KeyID, t.Backend, t.SocketPath, want, dom.Name), false
	}
	return hookproto.Reply{}, true
}

// vtpmKeys checks the metadata against this host's provider and KDK cache and derives the
// vTPM's state and migration keys; on refusal it returns the sentence.
func (d *Daemon) vtpmKeys(dom *domxml.Domain, obj domxml.Object) (vtpm.Keys, hookproto.Reply, bool) {
	d.mu.Lock()
	info := d.id.info
	d.mu.Unlock()
	if info.Revoked != nil {
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): this host (%s) was revoked by the provider on %s and holds no keys: an administrator must allow it again, then join it again (nkp-hostd join)", dom.Name, obj.KeyID, info.HostID, info.Revoked.Format(time.RFC3339)), false
	}
	if info.ProviderID != "" && dom.Metadata.ProviderID != info.ProviderID {
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): its keys come from provider %s, but this host is joined to provider %s: run it on a host of that provider, or unprotect and protect it again here", dom.Name, obj.KeyID, dom.Metadata.ProviderID, info.ProviderID), false
	}
	k, id, err := d.cache.Key(obj.KDKVersion)
	if errors.Is(err, kdkcache.ErrUnknownVersion) && d.isOnline() {
		// A version rotated in since the last sync (or a VM protected on another host
		// with it): ask the provider now rather than refuse.
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d.syncNow(sctx)
		cancel()
		k, id, err = d.cache.Key(obj.KDKVersion)
	}
	switch {
	case errors.Is(err, kdkcache.ErrUnknownVersion):
		why := "the provider has not released it to this host yet"
		if !d.cache.Persistent() {
			why = "this host has no TPM, so it keeps KDKs in memory only and has not reached the provider since nkp-hostd started"
		} else if !d.isOnline() {
			why = "the provider is unreachable and the version is not in this host's TPM-bound cache"
		}
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): KDK version %d (%s) is unknown to this host: %s; bring the provider back or check `nkpctl provider status`, then start the VM again", dom.Name, obj.KeyID, obj.KDKVersion, obj.KDKID, why), false
	case errors.Is(err, kdkcache.ErrUnusable):
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): this host's TPM cannot unwrap its cached KDK version %d (the blob was made for another TPM, or is damaged): with the provider reachable nkp-hostd fetches a fresh one; if this host's TPM was replaced, join it again", dom.Name, obj.KeyID, obj.KDKVersion), false
	case err != nil:
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): %v", dom.Name, obj.KeyID, err), false
	}
	defer clear(k)
	if id != obj.KDKID {
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): its metadata names KDK %s as version %d, but this host's version %d is KDK %s: the metadata comes from another provider or was edited; unprotect and protect the VM again", dom.Name, obj.KeyID, obj.KDKID, obj.KDKVersion, obj.KDKVersion, id), false
	}
	var keys vtpm.Keys
	keys.State, err = kdk.Derive(k, kdk.PurposeVTPM, dom.UUID, obj.KeyID)
	if err == nil {
		keys.Migration, err = kdk.Derive(k, kdk.PurposeVTPMMigration, dom.UUID, obj.KeyID)
	}
	if err != nil {
		keys.Wipe()
		return vtpm.Keys{}, refuse("VM %q (vTPM key %s): %v", dom.Name, obj.KeyID, err), false
	}
	return keys, hookproto.Reply{}, true
}

func (d *Daemon) offlineWarning(name string, version int) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.online {
		return ""
	}
	return fmt.Sprintf("nkp: warning: the provider has been unreachable since %s; VM %q starts with KDK version %d from this host's cache", d.since.UTC().Format(time.RFC3339), name, version)
}

func (d *Daemon) isOnline() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.online
}
