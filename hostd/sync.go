package hostd

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
)

// providerIDOf reads the provider ID from its CA certificate ("nkp provider CA <id>").
func providerIDOf(ca *x509.Certificate) string {
	id, ok := strings.CutPrefix(ca.Subject.CommonName, "nkp provider CA ")
	if !ok {
		return ""
	}
	return id
}

// Sync asks the provider once: KDK releases (rotation, retirement), revocation, and the
// certificate's renewal. The sync loop calls it every SyncInterval; tests call it directly.
//
// A host that holds every KDK version of the provider's current key set asks with that
// set (client.ReleaseChanged): while it is current the provider answers Unchanged from one
// store read, hands out no key and writes no audit record, so a cluster's steady polling
// costs the provider nothing durable. The first sync after a start, a sync after a
// change, and any sync while a cached version is unusable (its blob does not unwrap on
// this TPM) fetch the whole release, which is audited.
func (d *Daemon) Sync(ctx context.Context) error {
	n := d.syncStarts.Add(1)
	defer func() {
		for done := d.syncDone.Load(); done < n && !d.syncDone.CompareAndSwap(done, n); done = d.syncDone.Load() {
		}
	}()
	d.mu.Lock()
	revoked := d.id.info.Revoked != nil
	d.mu.Unlock()
	if revoked {
		return nil // nothing to ask: a revoked host must join again
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	known := d.knownKeySet()
	rel, err := d.pc.ReleaseChanged(rctx, known)
	var ae *client.APIError
	switch {
	case err == nil:
		d.setOnline(true, nil)
	case client.IsCode(err, apiv1.CodeHostRevoked) || client.IsCode(err, apiv1.CodeHostUnknown):
		d.setOnline(true, nil)
		return d.revoke(err)
	case errors.As(err, &ae):
		// The provider answered but will not release now (not backed up, policy...): the
		// cache stays as it is.
		d.setOnline(true, nil)
		d.log.Warn("the provider refused to release KDKs; using the cache", "err", err)
		return err
	default:
		d.setOnline(false, err)
		return err
	}
	if !rel.Unchanged {
		ch, err := d.cache.Update(rel)
		if err != nil {
			d.setKeySet("")
			d.log.Error("KDK release not applied", "err", err)
			return err
		}
		if len(ch.Added)+len(ch.Removed) > 0 {
			d.log.Info("KDK versions updated", "added", ch.Added, "removed", ch.Removed, "primary", ch.Primary)
		}
		if m := d.secrets.Load(); m != nil && len(ch.Added) > 0 {
			m.RequestAll() // disks under the new versions get their secrets
		}
		d.setKeySet(rel.KeySet)
	}
	d.mu.Lock()
	d.lastOK = d.cfg.Now()
	pid := rel.ProviderID
	if pid == "" {
		pid = providerIDOf(d.id.ca)
	}
	var saveErr error
	if pid != "" && d.id.info.ProviderID != pid {
		d.id.info.ProviderID = pid
		saveErr = d.id.saveInfo(d.cfg.StateDir)
	}
	d.mu.Unlock()
	if saveErr != nil {
		return saveErr
	}
	return d.renewIfDue(ctx)
}

// knownKeySet is the key set to ask with: the last applied one, or "" (a full release)
// when none was applied or a cached version cannot be used on this TPM.
func (d *Daemon) knownKeySet() string {
	for _, v := range d.cache.Versions() {
		if v.Err != "" {
			return ""
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.keySet
}

func (d *Daemon) setKeySet(ks string) {
	d.mu.Lock()
	d.keySet = ks
	d.mu.Unlock()
}

func (d *Daemon) setOnline(on bool, err error) {
	d.mu.Lock()
	changed := d.online != on
	if changed {
		d.online, d.since = on, d.cfg.Now()
	}
	d.mu.Unlock()
	d.metrics.setOnline(on)
	switch {
	case changed && !on:
		d.log.Warn("the provider is unreachable: protected VMs start from the KDK cache; KDK rotation, revocation and certificate renewal wait until it is back",
			"err", err, "cached_versions", len(d.cache.Versions()), "tpm_bound", d.cache.Persistent())
	case changed && on:
		d.log.Info("the provider is reachable again")
	}
}

// revoke applies the revocation policy: forget every KDK at once and refuse later starts;
// running VMs keep their vTPMs.
func (d *Daemon) revoke(cause error) error {
	now := d.cfg.Now().UTC()
	d.mu.Lock()
	if d.id.info.Revoked == nil {
		d.id.info.Revoked = &now
	}
	err := d.id.saveInfo(d.cfg.StateDir)
	d.mu.Unlock()
	if ferr := d.cache.Forget(); ferr != nil && err == nil {
		err = ferr
	}
	d.metrics.revoked.Set(1)
	if m := d.secrets.Load(); m != nil {
		m.RequestForget() // libvirt is not called here: a hook's syncNow may be asking
	}
	d.log.Error("this host was revoked by the provider: its KDK cache is deleted; running VMs keep their vTPMs, new starts of protected VMs are refused", "cause", cause, "running_vtpms", d.sup.Running())
	return err
}

// renewIfDue renews the host certificate when less than RenewBefore is left.
func (d *Daemon) renewIfDue(ctx context.Context) error {
	d.mu.Lock()
	leaf := d.id.cert.Leaf
	key := d.id.key
	d.mu.Unlock()
	before := d.cfg.RenewBefore
	if before == 0 {
		before = leaf.NotAfter.Sub(leaf.NotBefore) / 3
	}
	if d.cfg.Now().Add(before).Before(leaf.NotAfter) {
		return nil
	}
	cert, err := d.pc.Renew(ctx, key)
	if err != nil {
		d.log.Warn("host certificate renewal failed; retrying at the next sync", "not_after", leaf.NotAfter, "err", err)
		return err
	}
	d.mu.Lock()
	d.id.cert = cert
	err = d.id.saveCert(d.cfg.StateDir)
	d.mu.Unlock()
	if err != nil {
		d.log.Error("renewed host certificate not saved: the next start uses the old one, which the provider accepts until the new one is used", "err", err)
		return err
	}
	d.metrics.certExpiry.Set(float64(cert.Leaf.NotAfter.Unix()))
	d.log.Info("host certificate renewed", "not_after", cert.Leaf.NotAfter, "serial", cert.Leaf.SerialNumber.Text(16))
	return nil
}

// syncNow runs Sync for a hook that needs a KDK version the cache lacks; concurrent
// callers share one sync: a caller that waited while a sync begun after its call
// finished does not ask again. (It used to skip whenever a sync had finished in the
// last two seconds, which refused a version rotated in during those seconds; a steady
// sync costs the provider one unaudited store read, so no throttle is needed.)
func (d *Daemon) syncNow(ctx context.Context) {
	called := d.syncStarts.Load()
	d.syncMu.Lock()
	defer d.syncMu.Unlock()
	if d.syncDone.Load() > called {
		return
	}
	d.Sync(ctx)
}

// syncLoop runs Sync at start and every SyncInterval (sooner on a kick). Provider
// errors are not fatal: the daemon keeps serving from the cache.
func (d *Daemon) syncLoop(ctx context.Context) error {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-d.kick:
		}
		d.Sync(ctx)
		t.Reset(d.cfg.SyncInterval)
	}
}
