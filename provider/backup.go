package provider

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/backup"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// PendingBackupTTL is how long a written backup waits for ConfirmBackup; an archive
// confirmed later is refused (take the backup again).
const PendingBackupTTL = 24 * time.Hour

// maxPendingBackups bounds the unconfirmed backups kept (the oldest go first).
const maxPendingBackups = 16

// pendingBackup is a written archive waiting for its confirmation (bucket "backups",
// key = hex SHA-256 of the archive). Confirmed records stay until they expire, so a
// confirmation repeated (a client retry, another replica) is answered the same way.
type pendingBackup struct {
	SHA256     string     `json:"sha256"`
	ProviderID string     `json:"provider_id"`
	Created    time.Time  `json:"created"`
	KDKIDs     []string   `json:"kdk_ids"`
	KDKs       []int      `json:"kdk_versions"`
	Primary    int        `json:"primary"`
	Hosts      int        `json:"hosts"`
	Objects    int        `json:"objects"`
	Bytes      int64      `json:"bytes"`
	Confirmed  *time.Time `json:"confirmed,omitempty"`
	// AuditSeq is the audit head the archive records (0: none).
	AuditSeq uint64 `json:"audit_seq,omitempty"`
}

func (b pendingBackup) info() BackupInfo {
	return BackupInfo{ProviderID: b.ProviderID, Created: b.Created, KDKs: b.KDKs, Primary: b.Primary,
		Hosts: b.Hosts, Objects: b.Objects, Bytes: b.Bytes, SHA256: b.SHA256}
}

// Backup writes an age archive (scrypt, passphrase) of everything needed to rebuild the
// provider — KDK versions, CA, hosts, catalog, policy — to w and records it as pending:
// nothing is marked backed up yet. Only ConfirmBackup with the archive's SHA256 (what the
// caller computes after storing the archive durably and opening it again with the
// passphrase) marks the KDK versions it holds as backed up, making the provider Active. A
// backup never confirmed leaves the state as it was. The passphrase never leaves this
// call; the caller wipes it. A passphrase that breaks backup.CheckPassphrase's rule is
// refused with ErrBadRequest; archives are always written at age's default scrypt cost.
func (p *Provider) Backup(ctx context.Context, w io.Writer, passphrase []byte) (BackupInfo, error) {
	if err := backup.CheckPassphrase(passphrase); err != nil {
		return BackupInfo{}, fmt.Errorf("backup: %w: %w", ErrBadRequest, err)
	}
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
	n, err := p.cfg.writeArchive(io.MultiWriter(w, sum), passphrase, doc)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("backup of provider %s: %w", doc.ProviderID, err)
	}
	in := infoOf(doc, n, sum)
	pend := pendingBackup{SHA256: in.SHA256, ProviderID: in.ProviderID, Created: in.Created, KDKs: in.KDKs,
		Primary: in.Primary, Hosts: in.Hosts, Objects: in.Objects, Bytes: n}
	if doc.AuditHead != nil {
		pend.AuditSeq = doc.AuditHead.Seq
	}
	for _, k := range doc.KDKs {
		if k.Retired == nil {
			pend.KDKIDs = append(pend.KDKIDs, k.ID)
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
		if err := p.prunePending(tx); err != nil {
			return err
		}
		if err := putJSON(tx, bucketBackups, pend.SHA256, pend); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindBackup, Actor: actorOf(ctx), Subject: m.ID, Details: map[string]string{
			"stage": "written", "kdk_versions": joinInts(in.KDKs), "hosts": strconv.Itoa(in.Hosts), "objects": strconv.Itoa(in.Objects),
			"bytes": strconv.FormatInt(n, 10), "created": doc.Created.Format(time.RFC3339), "archive_sha256": in.SHA256,
		}})
	})
	if err != nil {
		return BackupInfo{}, fmt.Errorf("backup of provider %s was written, but recording it failed (the provider stays as it was; take the backup again): %w", doc.ProviderID, err)
	}
	return in, nil
}

// ConfirmBackup marks the KDK versions held by the archive whose hex SHA-256 is sum as
// backed up — the provider becomes Active once every live version is — and records the
// backup time. Call it only after the archive is stored durably and was opened again with
// its passphrase. An unknown sum, or a backup written more than PendingBackupTTL ago,
// fails with ErrNotFound; confirming a confirmed backup again returns its info.
func (p *Provider) ConfirmBackup(ctx context.Context, sum string) (BackupInfo, error) {
	sum = strings.ToLower(strings.TrimSpace(sum))
	if b, err := hex.DecodeString(sum); err != nil || len(b) != sha256.Size {
		return BackupInfo{}, fmt.Errorf("confirm backup: %w: %q is not a hex SHA-256 (64 hex digits, as sha256sum prints it)", ErrBadRequest, sum)
	}
	var pend pendingBackup
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		err = getJSON(tx, bucketBackups, sum, &pend)
		if errors.Is(err, store.ErrNotFound) || (err == nil && p.now().Sub(pend.Created) > PendingBackupTTL) {
			return fmt.Errorf("%w: no backup with SHA-256 %s is waiting for confirmation (never taken here, or older than %v); take the backup again", ErrNotFound, sum, PendingBackupTTL)
		}
		if err != nil {
			return err
		}
		if pend.ProviderID != m.ID {
			return fmt.Errorf("%w: backup %s is of provider %s, the store now holds provider %s; take the backup again", ErrNotFound, sum, pend.ProviderID, m.ID)
		}
		if pend.Confirmed != nil {
			return nil
		}
		included := map[string]bool{}
		for _, id := range pend.KDKIDs {
			included[id] = true
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		for _, k := range kdks {
			if included[k.ID] && !k.BackedUp && k.Retired == nil {
				k.BackedUp = true
				if err := putJSON(tx, bucketKDKs, kdkKey(k.Version), k); err != nil {
					return err
				}
			}
		}
		changed := false
		if m.LastBackup == nil || pend.Created.After(*m.LastBackup) {
			t := pend.Created
			m.LastBackup = &t
			changed = true
		}
		if pend.AuditSeq > m.BackupAuditSeq {
			m.BackupAuditSeq = pend.AuditSeq
			changed = true
		}
		if changed {
			if err := putJSON(tx, bucketProvider, keyMeta, m); err != nil {
				return err
			}
		}
		now := p.now().UTC()
		pend.Confirmed = &now
		if err := putJSON(tx, bucketBackups, sum, pend); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindBackup, Actor: actorOf(ctx), Subject: m.ID, Details: map[string]string{
			"stage": "confirmed", "kdk_versions": joinInts(pend.KDKs), "created": pend.Created.Format(time.RFC3339), "archive_sha256": sum,
		}})
	})
	if err != nil {
		return BackupInfo{}, fmt.Errorf("confirm backup: %w", err)
	}
	return pend.info(), nil
}

// prunePending drops expired backup records and keeps at most maxPendingBackups-1, so
// that one more fits.
func (p *Provider) prunePending(tx store.Tx) error {
	var all []pendingBackup
	if err := tx.List(bucketBackups, "", func(_ string, v []byte) error {
		var b pendingBackup
		if json.Unmarshal(v, &b) == nil {
			all = append(all, b)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("listing pending backups: %w", err)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Created.Before(all[j].Created) })
	for i, b := range all {
		if p.now().Sub(b.Created) > PendingBackupTTL || len(all)-i >= maxPendingBackups {
			if err := tx.Delete(bucketBackups, b.SHA256); err != nil {
				return fmt.Errorf("pruning pending backup %s: %w", b.SHA256, err)
			}
		}
	}
	return nil
}

// pendingBackups counts the backups written and not yet confirmed (nor expired).
func (p *Provider) pendingBackups(tx store.Tx) (int, error) {
	n := 0
	err := tx.List(bucketBackups, "", func(_ string, v []byte) error {
		var b pendingBackup
		if json.Unmarshal(v, &b) == nil && b.Confirmed == nil && p.now().Sub(b.Created) <= PendingBackupTTL {
			n++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("listing pending backups: %w", err)
	}
	return n, nil
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
	admins, err := listAdmins(tx)
	if err != nil {
		return doc, err
	}
	for _, a := range admins {
		doc.Admins = append(doc.Admins, backup.Admin{Name: a.Name, Serial: a.Serial, Issued: a.Issued, NotAfter: a.NotAfter, Revoked: a.Revoked})
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
		for _, ad := range doc.Admins {
			rec := adminRecord{Name: ad.Name, Serial: ad.Serial, Issued: ad.Issued, NotAfter: ad.NotAfter, Revoked: ad.Revoked}
			if err := putJSON(tx, bucketAdmins, ad.Serial, rec); err != nil {
				return err
			}
		}
		in := doc.Info()
		details := map[string]string{
			"archive_created": doc.Created.Format(time.RFC3339), "kdk_versions": joinInts(in.KDKVersions),
			"hosts": strconv.Itoa(in.Hosts), "objects": strconv.Itoa(in.Objects), "forced": strconv.FormatBool(replaced != ""),
			"archive_sha256": info.SHA256, "admins": strconv.Itoa(len(doc.Admins)),
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
