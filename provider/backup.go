package provider

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/backup"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// Backup writes an age archive (scrypt, passphrase) of everything needed to rebuild the
// provider — KDK versions, CA, hosts, catalog, policy — to w, then marks the KDK versions
// it holds as backed up: once every live version is, the provider is Active. The
// passphrase never leaves this call; the caller wipes it.
//
// The versions are marked as soon as w accepted every byte, so w should be durable (a
// file the caller fsyncs, or a buffer it delivers before reporting success).
func (p *Provider) Backup(ctx context.Context, w io.Writer, passphrase []byte) (BackupInfo, error) {
	var doc *backup.Document
	err := p.st.View(ctx, func(tx store.Tx) error {
		var err error
		doc, err = p.document(tx)
		return err
	})
	if err != nil {
		return BackupInfo{}, fmt.Errorf("backup: %w", err)
	}
	defer doc.Wipe()
	sum := sha256.New()
	n, err := backup.Write(io.MultiWriter(w, sum), passphrase, doc, backup.WriteOptions{WorkFactor: p.cfg.BackupWorkFactor})
	if err != nil {
		return BackupInfo{}, fmt.Errorf("backup of provider %s: %w", doc.ProviderID, err)
	}
	in := infoOf(doc, n, sum)
	included := map[string]bool{}
	for _, k := range doc.KDKs {
		if k.Retired == nil {
			included[k.ID] = true
		}
	}
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		if m.ID != doc.ProviderID {
			return fmt.Errorf("the store now holds provider %s (restored during the backup); take the backup again", m.ID)
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		for _, k := range kdks {
			if included[k.ID] && !k.BackedUp {
				k.BackedUp = true
				if err := putJSON(tx, bucketKDKs, kdkKey(k.Version), k); err != nil {
					return err
				}
			}
		}
		t := doc.Created
		m.LastBackup = &t
		if err := putJSON(tx, bucketProvider, keyMeta, m); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindBackup, Actor: actorOf(ctx), Subject: m.ID, Details: map[string]string{
			"kdk_versions": joinInts(in.KDKs), "hosts": strconv.Itoa(in.Hosts), "objects": strconv.Itoa(in.Objects),
			"bytes": strconv.FormatInt(n, 10), "created": doc.Created.Format(time.RFC3339), "archive_sha256": in.SHA256,
		}})
	})
	if err != nil {
		return BackupInfo{}, fmt.Errorf("backup of provider %s was written, but recording it failed (the provider stays as it was; take the backup again): %w", doc.ProviderID, err)
	}
	return in, nil
}

// document collects the provider's state into a backup document (with keys: wipe it).
func (p *Provider) document(tx store.Tx) (doc *backup.Document, err error) {
	m, err := readMeta(tx)
	if err != nil {
		return nil, err
	}
	doc = &backup.Document{Format: backup.Format, Version: backup.Version, Created: p.now().UTC(),
		ProviderID: m.ID, ProviderCreated: m.Created, Policy: backup.Policy{TPMRequired: m.Policy.TPMRequired}}
	defer func() {
		if err != nil {
			doc.Wipe()
			doc = nil
		}
	}()
	var car caRecord
	if err := getJSON(tx, bucketProvider, keyCA, &car); err != nil {
		return doc, fmt.Errorf("reading the CA: %w", err)
	}
	caKey, err := p.rk.Open(car.SealedKey, caAD(m.ID))
	if err != nil {
		return doc, fmt.Errorf("CA key: %w: %w", ErrRootKeyMismatch, err)
	}
	doc.CA = backup.CA{Cert: car.Cert, Key: caKey}
	kdks, err := listKDKs(tx)
	if err != nil {
		return doc, err
	}
	for _, k := range kdks {
		bk := backup.KDK{ID: k.ID, Version: k.Version, Created: k.Created, Primary: k.Primary, Retired: k.Retired}
		if k.Retired == nil {
			if bk.Key, err = p.openKDK(m.ID, k); err != nil {
				return doc, err
			}
		}
		doc.KDKs = append(doc.KDKs, bk)
	}
	hosts, err := listHosts(tx)
	if err != nil {
		return doc, err
	}
	for _, h := range hosts {
		doc.Hosts = append(doc.Hosts, backup.Host{ID: h.ID, Hostname: h.Hostname, Enrolled: h.Enrolled,
			CertSerial: h.CertSerial, CertNotAfter: h.CertNotAfter, EKPublic: h.EKPublic, Revoked: h.Revoked})
	}
	objs, err := listObjects(tx, "")
	if err != nil {
		return doc, err
	}
	for _, o := range objs {
		doc.Objects = append(doc.Objects, backup.Object{VMUUID: o.VMUUID, Name: o.Name, KeyID: o.KeyID,
			KDKID: o.KDKID, KDKVersion: o.KDKVersion, HostID: o.HostID, Registered: o.Registered})
	}
	seq, hash, err := audit.Head(tx)
	if err != nil {
		return doc, err
	}
	if seq > 0 {
		doc.AuditHead = &backup.AuditHead{Seq: seq, Hash: hash}
	}
	return doc, nil
}

func infoOf(d *backup.Document, n int64, sum hash.Hash) BackupInfo {
	in := d.Info()
	return BackupInfo{ProviderID: in.ProviderID, Created: in.Created, KDKs: in.KDKVersions, Primary: in.Primary,
		Hosts: in.Hosts, Objects: in.Objects, Bytes: n, SHA256: hex.EncodeToString(sum.Sum(nil))}
}

// readArchive reads and checks an archive, hashing every byte of r.
func readArchive(r io.Reader, passphrase []byte) (*backup.Document, BackupInfo, error) {
	sum := sha256.New()
	tee := io.TeeReader(r, sum)
	doc, n, err := backup.Read(tee, passphrase)
	if err != nil {
		return nil, BackupInfo{}, err
	}
	// backup.Read stops at the end of the age stream, which is the end of the file.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		doc.Wipe()
		return nil, BackupInfo{}, fmt.Errorf("reading the archive: %w", err)
	}
	return doc, infoOf(doc, n, sum), nil
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// VerifyBackup opens an archive with passphrase and checks it completely (every field,
// the CA key against its certificate, the catalog against the KDK versions). It changes
// nothing.
func (p *Provider) VerifyBackup(ctx context.Context, r io.Reader, passphrase []byte) (BackupInfo, error) {
	doc, info, err := readArchive(r, passphrase)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("verify backup: %w", err)
	}
	doc.Wipe()
	return info, nil
}

// Restore rebuilds the provider from an archive: same provider ID, KDK versions, CA,
// hosts, catalog and policy, so enrolled hosts and protected VMs keep working. Keys are
// sealed under this Provider's root key. A store that holds a provider is refused with
// ErrNotEmpty unless force; with force its state is replaced (its audit log is kept and
// the restore appended to it). Unused join tokens are not in archives.
func (p *Provider) Restore(ctx context.Context, r io.Reader, passphrase []byte, force bool) (Status, error) {
	doc, info, err := readArchive(r, passphrase)
	if err != nil {
		return Status{}, fmt.Errorf("restore: %w", err)
	}
	defer doc.Wipe()
	authority, err := ca.Parse(doc.CA.Cert, doc.CA.Key)
	if err != nil {
		return Status{}, fmt.Errorf("restore: %w: %w", ErrBadArchive, err)
	}
	for _, h := range doc.Hosts {
		if len(h.EKPublic) > 0 {
			if _, _, err := parseEK(h.EKPublic); err != nil {
				return Status{}, fmt.Errorf("restore: host %s (%s): %w: %w", h.ID, h.Hostname, ErrBadArchive, err)
			}
		}
	}
	id := doc.ProviderID
	sealedCA, err := p.rk.Seal(doc.CA.Key, caAD(id))
	if err != nil {
		return Status{}, fmt.Errorf("restore: %w", err)
	}
	check, err := p.rk.Seal([]byte(rootCheckPlain), rootCheckAD(id))
	if err != nil {
		return Status{}, fmt.Errorf("restore: %w", err)
	}
	kdks := make([]kdkRecord, 0, len(doc.KDKs))
	for _, k := range doc.KDKs {
		rec := kdkRecord{ID: k.ID, Version: k.Version, Created: k.Created, Primary: k.Primary, Retired: k.Retired, BackedUp: true}
		if k.Retired == nil {
			if rec.Sealed, err = p.sealKDK(id, k.ID, k.Key); err != nil {
				return Status{}, fmt.Errorf("restore: %w", err)
			}
		}
		kdks = append(kdks, rec)
	}
	var replaced string
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		replaced = ""
		m, err := readMeta(tx)
		switch {
		case err == nil && !force:
			return fmt.Errorf("%w: the store holds provider %s; restore only into an empty provider, or force it to replace that provider's state", ErrNotEmpty, m.ID)
		case err == nil:
			replaced = m.ID
			if err := wipeBuckets(tx); err != nil {
				return err
			}
		case !errors.Is(err, ErrNotInitialized):
			return err
		}
		created := doc.Created
		meta := metaRecord{ID: id, Created: doc.ProviderCreated, Policy: Policy{TPMRequired: doc.Policy.TPMRequired},
			LastBackup: &created, RootCheck: check, RestoredFrom: &created}
		if err := putJSON(tx, bucketProvider, keyMeta, meta); err != nil {
			return err
		}
		if err := putJSON(tx, bucketProvider, keyCA, caRecord{Cert: doc.CA.Cert, SealedKey: sealedCA}); err != nil {
			return err
		}
		for _, k := range kdks {
			if err := putJSON(tx, bucketKDKs, kdkKey(k.Version), k); err != nil {
				return err
			}
		}
		for _, h := range doc.Hosts {
			rec := hostRecord{ID: h.ID, Hostname: h.Hostname, Enrolled: h.Enrolled, CertSerial: h.CertSerial,
				CertNotAfter: h.CertNotAfter, EKPublic: h.EKPublic, Revoked: h.Revoked}
			if err := putJSON(tx, bucketHosts, h.ID, rec); err != nil {
				return err
			}
		}
		for _, o := range doc.Objects {
			obj := Object{VMUUID: o.VMUUID, Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion,
				HostID: o.HostID, Registered: o.Registered}
			if err := putJSON(tx, bucketObjects, objectKey(o.VMUUID, o.Name), obj); err != nil {
				return err
			}
		}
		in := doc.Info()
		details := map[string]string{
			"archive_created": doc.Created.Format(time.RFC3339), "kdk_versions": joinInts(in.KDKVersions),
			"hosts": strconv.Itoa(in.Hosts), "objects": strconv.Itoa(in.Objects), "forced": strconv.FormatBool(replaced != ""),
			"archive_sha256": info.SHA256,
		}
		if replaced != "" {
			details["replaced_provider"] = replaced
		}
		if doc.AuditHead != nil {
			details["archive_audit_seq"] = strconv.FormatUint(doc.AuditHead.Seq, 10)
			details["archive_audit_hash"] = doc.AuditHead.Hash
		}
		return a.add(tx, audit.Event{Kind: audit.KindRestore, Actor: actorOf(ctx), Subject: id, Details: details})
	})
	if err != nil {
		return Status{}, fmt.Errorf("restore of provider %s: %w", id, err)
	}
	p.setCA(authority, id)
	if replaced != "" {
		p.log.Warn("restore replaced the provider's state", "provider_id", id, "replaced_provider", replaced)
	}
	return p.Status(ctx)
}

// wipeBuckets deletes the provider's own state (not the audit log).
func wipeBuckets(tx store.Tx) error {
	for _, b := range ownBuckets {
		var keys []string
		if err := tx.List(b, "", func(k string, _ []byte) error { keys = append(keys, k); return nil }); err != nil {
			return fmt.Errorf("clearing %s: %w", b, err)
		}
		for _, k := range keys {
			if err := tx.Delete(b, k); err != nil {
				return fmt.Errorf("clearing %s/%s: %w", b, k, err)
			}
		}
	}
	return nil
}
