package hostd

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
	"github.com/nkp-dev/nkp/hostd/disksecret"
	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
)

// diskKeys derives disk keys from the KDK cache (disksecret.Keys).
type diskKeys struct{ d *Daemon }

func (k diskKeys) DiskKey(_ context.Context, vmUUID string, o domxml.Object) ([]byte, error) {
	k.d.mu.Lock()
	revoked := k.d.id.info.Revoked != nil
	k.d.mu.Unlock()
	if revoked {
		return nil, errors.New("this host was revoked by the provider and holds no keys")
	}
	key, id, err := k.d.cache.Key(o.KDKVersion)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if id != o.KDKID {
		return nil, fmt.Errorf("the metadata names KDK %s as version %d, but this host's version %d is KDK %s (metadata from another provider, or edited)", o.KDKID, o.KDKVersion, o.KDKVersion, id)
	}
	return kdk.Derive(key, kdk.PurposeDisk, vmUUID, o.KeyID)
}

// diskImage returns the image of disk target of a domain XML and the qemuimg format it
// opens with, if the disk is a file whose <encryption format='luks'> names secretUUID.
func diskImage(doc []byte, target, secretUUID string) (path, format string) {
	dom, err := domxml.Parse(doc)
	if err != nil {
		return "", ""
	}
	return domainDiskImage(dom, target, secretUUID)
}

// domainDiskImage is diskImage of a parsed domain.
func domainDiskImage(dom *domxml.Domain, target, secretUUID string) (path, format string) {
	disk, ok := dom.Disk(target)
	if !ok || disk.Type != "file" || disk.Source == "" || disk.Encryption == nil || disk.Encryption.Format != "luks" || disk.Encryption.SecretUUID != secretUUID {
		return "", ""
	}
	if disk.DriverType == string(qemuimg.QCOW2) {
		return disk.Source, string(qemuimg.QCOW2)
	}
	return disk.Source, string(qemuimg.LUKS) // raw + LUKS encryption: a raw LUKS image
}

// imageVerifier opens images with qemu-img (disksecret.Verifier).
type imageVerifier struct{ t *qemuimg.Tool }

func (v imageVerifier) Opens(ctx context.Context, path, format string, pass []byte) error {
	err := v.t.Unlock(ctx, qemuimg.Image{Path: path, Format: qemuimg.Format(format), Key: pass})
	if errors.Is(err, qemuimg.ErrWrongKey) || errors.Is(err, qemuimg.ErrNotEncrypted) {
		return fmt.Errorf("%w: %v", disksecret.ErrWrongKey, err)
	}
	return err
}

// checkDisks answers the disk part of a prepare, restore or migrate hook from memory:
// every disk object's secret must be defined by this hostd (and its image not known to
// refuse the key: an image whose file changed since it was verified is verified again,
// inline). A refusal names the VM, the disk, its key ID and KDK version and the
// way out; where hostd can fix it (not defined yet, KDK version arriving, a libvirt
// error) it queues the definition from the hook's XML, so a retry succeeds.
func (d *Daemon) checkDisks(ctx context.Context, req hookproto.Request, dom *domxml.Domain, disks []domxml.Object) (hookproto.Reply, bool) {
	d.mu.Lock()
	info := d.id.info
	d.mu.Unlock()
	o := disks[0]
	tgt := o.Name[len(disksecret.DiskPrefix):]
	if info.Revoked != nil {
		return refuse("VM %q disk %s (key %s, KDK v%d): this host (%s) was revoked by the provider on %s and holds no keys: an administrator must allow it again, then join it again (nkp-hostd join)", dom.Name, tgt, o.KeyID, o.KDKVersion, info.HostID, info.Revoked.Format(time.RFC3339)), false
	}
	if info.ProviderID != "" && dom.Metadata.ProviderID != info.ProviderID {
		return refuse("VM %q disk %s (key %s, KDK v%d): its keys come from provider %s, but this host is joined to provider %s: run it on a host of that provider, or unprotect and protect it again here", dom.Name, tgt, o.KeyID, o.KDKVersion, dom.Metadata.ProviderID, info.ProviderID), false
	}
	m := d.secrets.Load()
	if m == nil {
		return refuse("VM %q disk %s (key %s, KDK v%d): nkp-hostd is not connected to libvirt yet, so it has not defined the disk's secret: check that libvirtd runs (and nkp-hostd's --libvirt), then start the VM again", dom.Name, tgt, o.KeyID, o.KDKVersion), false
	}
	// A stat per disk; an image replaced since it was verified is verified again here.
	nr := m.CheckImages(ctx, dom.UUID, dom.Name, disks, func(target, secretUUID string) (string, string) {
		return domainDiskImage(dom, target, secretUUID)
	})
	if nr == nil {
		nr = m.Check(dom.UUID, disks)
	}
	if nr == nil {
		return hookproto.Reply{}, true
	}
	again := "run `virsh start " + dom.Name + "` again in a few seconds"
	switch req.Op {
	case hookproto.OpMigrate:
		again = "retry the migration in a few seconds (or `virsh define` the domain on this host first)"
	case hookproto.OpRestore:
		again = "run the restore again in a few seconds"
	}
	head := fmt.Sprintf("VM %q disk %s (key %s, KDK v%d)", dom.Name, nr.Target, nr.Object.KeyID, nr.Object.KDKVersion)
	var r hookproto.Reply
	switch nr.Reason {
	case disksecret.WrongKey:
		// Nothing to define: the image itself is not this key's.
		r = refuse("%s: its image %s does not open under this key (made under another key, or replaced): put back the image this key opens, or check `nkpctl vm status %s`", head, nr.Path, dom.Name)
	case disksecret.NoKey:
		if errors.Is(nr.Err, kdkcache.ErrUnknownVersion) {
			select { // ask the provider now; a new version makes the manager define the secrets
			case d.kick <- struct{}{}:
			default:
			}
			why := "the provider has not released it to this host yet"
			if !d.isOnline() {
				why = "the provider is unreachable and the version is not in this host's cache"
			}
			r = refuse("%s: KDK version %d is unknown to this host (%s): nkp-hostd asks the provider now; %s, and if it persists check `nkpctl provider status`", head, nr.Object.KDKVersion, why, again)
		} else {
			r = refuse("%s: its key cannot be derived on this host (%v): see nkp-hostd's log; %s", head, nr.Err, again)
		}
		m.Kick(dom.UUID, dom.Name, disks, []byte(req.XML))
	case disksecret.DefineError:
		r = refuse("%s: libvirt refused its secret (%v): nkp-hostd tries again now; %s", head, nr.Err, again)
		m.Kick(dom.UUID, dom.Name, disks, []byte(req.XML))
	default:
		r = refuse("%s: its libvirt secret is not defined on this host yet; nkp-hostd is defining it now — %s", head, again)
		m.Kick(dom.UUID, dom.Name, disks, []byte(req.XML))
	}
	return r, false
}
