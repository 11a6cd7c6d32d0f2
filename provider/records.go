package provider

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nkp-dev/nkp/provider/store"
)

// Buckets and fixed keys in the store (see the package comment).
const (
	bucketProvider = "provider"
	bucketKDKs     = "kdks"
	bucketTokens   = "tokens"
	bucketHosts    = "hosts"
	bucketObjects  = "objects"
	bucketBackups  = "backups"
	keyMeta        = "meta"
	keyCA          = "ca"
)

// ownBuckets are the buckets a forced Restore empties (the audit log is kept).
var ownBuckets = []string{bucketProvider, bucketKDKs, bucketTokens, bucketHosts, bucketObjects, bucketBackups, bucketAdmins}

type metaRecord struct {
	ID         string     `json:"id"`
	Created    time.Time  `json:"created"`
	Policy     Policy     `json:"policy"`
	LastBackup *time.Time `json:"last_backup,omitempty"`
	RootCheck  []byte     `json:"root_check"`
	// RestoredFrom is the creation time of the archive the provider was restored from.
	RestoredFrom *time.Time `json:"restored_from,omitempty"`
	// BackupAuditSeq is the audit head (sequence number) recorded in the newest confirmed
	// backup taken since this provider's audit log began: PruneAudit keeps that record and
	// every later one. 0 = none yet (nothing may be pruned).
	BackupAuditSeq uint64 `json:"backup_audit_seq,omitempty"`
}

type caRecord struct {
	Cert      []byte `json:"cert"`
	SealedKey []byte `json:"sealed_key"`
}

type kdkRecord struct {
	ID       string     `json:"id"`
	Version  int        `json:"version"`
	Created  time.Time  `json:"created"`
	Primary  bool       `json:"primary"`
	Retired  *time.Time `json:"retired,omitempty"`
	BackedUp bool       `json:"backed_up"`
	Sealed   []byte     `json:"sealed,omitempty"`
}

func (k kdkRecord) public() KDKVersion {
	v := KDKVersion{ID: k.ID, Version: k.Version, Primary: k.Primary, Created: k.Created, BackedUp: k.BackedUp}
	if k.Retired != nil {
		v.Retired = *k.Retired
	}
	return v
}

type tokenRecord struct {
	ID         string     `json:"id"`
	SecretHash []byte     `json:"secret_hash"`
	Created    time.Time  `json:"created"`
	Expires    time.Time  `json:"expires"`
	Used       *time.Time `json:"used,omitempty"`
	HostID     string     `json:"host_id,omitempty"`
}

type hostRecord struct {
	ID           string    `json:"id"`
	Hostname     string    `json:"hostname"`
	Enrolled     time.Time `json:"enrolled"`
	CertSerial   string    `json:"cert_serial"`
	CertNotAfter time.Time `json:"cert_not_after"`
	// PrevCertSerial is the certificate a renewal superseded, accepted until the current
	// one is first presented (RenewHost).
	PrevCertSerial string     `json:"prev_cert_serial,omitempty"`
	EKPublic       []byte     `json:"ek_public,omitempty"`
	TokenID        string     `json:"token_id,omitempty"`
	Revoked        *time.Time `json:"revoked,omitempty"`
}

func (h hostRecord) public() Host {
	out := Host{ID: h.ID, Hostname: h.Hostname, Enrolled: h.Enrolled, CertSerial: h.CertSerial,
		CertNotAfter: h.CertNotAfter, EKPublic: h.EKPublic}
	if h.Revoked != nil {
		out.Revoked = *h.Revoked
	}
	return out
}

func kdkKey(version int) string { return fmt.Sprintf("%010d", version) }

func objectKey(vmUUID, name string) string { return vmUUID + "/" + name }

// getJSON reads and decodes bucket/key into v; a missing key wraps store.ErrNotFound.
func getJSON(tx store.Tx, bucket, key string, v any) error {
	b, err := tx.Get(bucket, key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("store record %s/%s is unreadable (%v); restore the provider from a backup", bucket, key, err)
	}
	return nil
}

// listJSON decodes the records of bucket whose keys start with prefix, in key order;
// what names them in the error.
func listJSON[T any](tx store.Tx, bucket, prefix, what string) ([]T, error) {
	var out []T
	err := tx.List(bucket, prefix, func(key string, value []byte) error {
		var v T
		if err := json.Unmarshal(value, &v); err != nil {
			return fmt.Errorf("store record %s/%s is unreadable (%v); restore the provider from a backup", bucket, key, err)
		}
		out = append(out, v)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", what, err)
	}
	return out, nil
}

func putJSON(tx store.Tx, bucket, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding %s/%s: %w", bucket, key, err)
	}
	if err := tx.Put(bucket, key, b); err != nil {
		return fmt.Errorf("writing %s/%s: %w", bucket, key, err)
	}
	return nil
}

// readMeta returns the provider's meta record, or ErrNotInitialized.
func readMeta(tx store.Tx) (metaRecord, error) {
	var m metaRecord
	err := getJSON(tx, bucketProvider, keyMeta, &m)
	if errors.Is(err, store.ErrNotFound) {
		return m, fmt.Errorf("%w: the store holds no provider; run `nkpctl provider init` or restore a backup", ErrNotInitialized)
	}
	if err != nil {
		return m, fmt.Errorf("reading provider record: %w", err)
	}
	return m, nil
}

// listKDKs returns every KDK record in version order.
func listKDKs(tx store.Tx) ([]kdkRecord, error) {
	return listJSON[kdkRecord](tx, bucketKDKs, "", "KDK versions")
}

func stateOf(kdks []kdkRecord) State {
	for _, k := range kdks {
		if k.Retired == nil && !k.BackedUp {
			return StateNotBackedUp
		}
	}
	return StateActive
}

func readHost(tx store.Tx, hostID string) (hostRecord, error) {
	var h hostRecord
	if checkUUID("host ID", hostID) != nil {
		return h, fmt.Errorf("host %.40q: %w: not a host ID", hostID, ErrHostUnknown)
	}
	err := getJSON(tx, bucketHosts, hostID, &h)
	if errors.Is(err, store.ErrNotFound) {
		return h, fmt.Errorf("host %s: %w: it is not enrolled with this provider; enroll it with a join token", hostID, ErrHostUnknown)
	}
	if err != nil {
		return h, fmt.Errorf("host %s: %w", hostID, err)
	}
	return h, nil
}

func listHosts(tx store.Tx) ([]hostRecord, error) {
	return listJSON[hostRecord](tx, bucketHosts, "", "hosts")
}

func listObjects(tx store.Tx, prefix string) ([]Object, error) {
	return listJSON[Object](tx, bucketObjects, prefix, "catalog objects")
}

// listPublic reads the records list returns in one View of an initialised provider and
// returns their public forms; what names the listing in the error.
func listPublic[R interface{ public() P }, P any](ctx context.Context, p *Provider, what string, list func(store.Tx) ([]R, error)) ([]P, error) {
	var out []P
	err := p.st.View(ctx, func(tx store.Tx) error {
		if _, err := readMeta(tx); err != nil {
			return err
		}
		recs, err := list(tx)
		for _, r := range recs {
			out = append(out, r.public())
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return out, nil
}
