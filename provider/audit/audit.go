// Package audit is the provider's append-only, hash-chained audit log, kept in the
// provider's store next to the state it describes. Append runs inside the caller's
// store.Update transaction, so an action and its record commit together or not at all.
//
// Each record carries a sequence number (1, 2, ...), a time, a kind (init, backup, restore,
// token, enroll, revoke, release, rotate, retire, ...), the actor, the subject and a small
// map of details, plus the hash of the previous record and its own hash:
//
//	hash_n = SHA-256("nkp-audit-v1\x00" || canonical(record_n without hash) ) with prev = hash_{n-1}
//
// The log's head (last sequence number and hash) is kept beside the records. Verify walks
// the chain and names the first record that was changed, removed or moved. Someone able to
// rewrite the whole store can rewrite the whole chain; Head gives the value to anchor
// elsewhere (a log line, a backup) to detect that too.
//
// Records never hold key material: Append refuses detail names that announce secrets
// (kdk, key, secret, passphrase, ...). Callers put identifiers (KDK ID, version, host ID,
// token ID) in details, never values.
//
// The log grows by one record per action (every KDK release). Prune deletes the oldest
// records, after the operator archived them (a backup holds them), and stays verifiable:
// the hash of the last pruned record becomes the chain's base, and Prune appends a
// "prune" record naming that base, so the removal is itself in the chain and a base
// moved without it is detected.
//
// Storage: bucket "audit" maps the 20-digit zero-padded sequence number to the record's
// JSON; bucket "audit.head" key "head" holds {"seq": N, "hash": "<hex>"} and key "base"
// the same for the last pruned record (absent until the first Prune).
//
// Only the provider package imports it.
//
// Kinds: init, backup, restore, token, enroll, revoke, release, rotate, retire,
// policy, register, unregister, move, forget, admin_cert, admin_revoke, host_renew,
// prune. AppendReads lists
// what Append reads, for store.Prefetch; Log writes the same event as one slog line
// and is called after the commit. The operator prunes through Provider.PruneAudit
// (POST /v1/admin/audit/prune, `nkpctl provider audit prune --before T`).
package audit

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/provider/store"
)

// Buckets used in the store.
const (
	Bucket     = "audit"
	HeadBucket = "audit.head"
	headKey    = "head"
	baseKey    = "base"
	// MaxPrune bounds the records one Prune deletes (one store transaction).
	MaxPrune = 4096
)

// Kind names what happened.
type Kind string

// The kinds the provider records.
const (
	KindInit     Kind = "init"
	KindBackup   Kind = "backup"
	KindRestore  Kind = "restore"
	KindToken    Kind = "token"
	KindEnroll   Kind = "enroll"
	KindRevoke   Kind = "revoke"
	KindRelease  Kind = "release"
	KindRotate   Kind = "rotate"
	KindRetire   Kind = "retire"
	KindPolicy   Kind = "policy"
	KindRegister Kind = "register"
	// KindUnregister: a host removed one of its catalog objects.
	KindUnregister Kind = "unregister"
	// KindMove: a host took over a migrated VM's catalog objects from another host.
	KindMove Kind = "move"
	// KindForget: an administrator removed catalog objects whose host is revoked or no
	// longer enrolled (a decommissioned or lost host's VMs).
	KindForget Kind = "forget"
	// KindAdminCert: an administrator certificate was issued.
	KindAdminCert Kind = "admin_cert"
	// KindAdminRevoke: an administrator certificate was revoked.
	KindAdminRevoke Kind = "admin_revoke"
	// KindHostRenew: a host renewed its certificate.
	KindHostRenew Kind = "host_renew"
	// KindPrune is appended by Prune itself.
	KindPrune Kind = "prune"
)

// Limits on an event's fields; an event beyond them is refused with ErrInvalidEvent.
const (
	MaxDetails     = 32
	MaxFieldLen    = 256  // kind, actor, subject, detail names
	MaxDetailValue = 1024 // one detail value
)

// Errors. Check with errors.Is.
var (
	// ErrTampered: Verify found a changed, removed or moved record; the error is a
	// *VerifyError naming the sequence number.
	ErrTampered = errors.New("audit log tampered with")
	// ErrInvalidEvent: Append refused the event (missing kind, secret-looking detail,
	// field too long).
	ErrInvalidEvent = errors.New("invalid audit event")
)

// Event is what the caller records.
type Event struct {
	// Time of the event; zero means time.Now(). Stored in UTC.
	Time time.Time
	// Kind is required.
	Kind Kind
	// Actor: who acted ("admin:<cert CN>", "host:<id>", "provider").
	Actor string
	// Subject: what the action was about (host ID, KDK ID, token ID, version).
	Subject string
	// Details: identifiers and counts; never key material.
	Details map[string]string
}

// Record is one entry of the log.
type Record struct {
	Seq     uint64            `json:"seq"`
	Time    time.Time         `json:"time"`
	Kind    Kind              `json:"kind"`
	Actor   string            `json:"actor,omitempty"`
	Subject string            `json:"subject,omitempty"`
	Details map[string]string `json:"details,omitempty"`
	// Prev is the hex hash of record Seq-1 ("" for record 1).
	Prev string `json:"prev"`
	// Hash is the hex SHA-256 of this record's canonical form.
	Hash string `json:"hash"`
}

// VerifyError names the first record where the chain does not hold.
type VerifyError struct {
	Seq    uint64
	Reason string
}

// Error says which record and why: "audit log: record 7: changed: ...".
func (e *VerifyError) Error() string {
	return fmt.Sprintf("audit log: record %d: %s", e.Seq, e.Reason)
}

// Is makes errors.Is(err, ErrTampered) true.
func (e *VerifyError) Is(target error) bool { return target == ErrTampered }

type head struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// secretNames are detail names refused by Append, compared in lower case.
var secretNames = map[string]bool{
	"kdk": true, "key": true, "secret": true, "passphrase": true, "password": true,
	"private_key": true, "privatekey": true, "token_secret": true, "bare": true,
	"import_blob": true, "plaintext": true, "root_key": true,
}

func checkEvent(ev Event) error {
	if ev.Kind == "" {
		return fmt.Errorf("%w: the kind is empty", ErrInvalidEvent)
	}
	for name, v := range map[string]string{"kind": string(ev.Kind), "actor": ev.Actor, "subject": ev.Subject} {
		if len(v) > MaxFieldLen {
			return fmt.Errorf("%w: %s of %d bytes is longer than %d", ErrInvalidEvent, name, len(v), MaxFieldLen)
		}
	}
	if len(ev.Details) > MaxDetails {
		return fmt.Errorf("%w: %d details, at most %d", ErrInvalidEvent, len(ev.Details), MaxDetails)
	}
	for k, v := range ev.Details {
		if k == "" || len(k) > MaxFieldLen {
			return fmt.Errorf("%w: detail name %.40q must be 1 to %d bytes", ErrInvalidEvent, k, MaxFieldLen)
		}
		if secretNames[strings.ToLower(k)] {
			return fmt.Errorf("%w: detail %q names key material, which never goes into the audit log; record its ID instead", ErrInvalidEvent, k)
		}
		if len(v) > MaxDetailValue {
			return fmt.Errorf("%w: detail %q of %d bytes is longer than %d", ErrInvalidEvent, k, len(v), MaxDetailValue)
		}
	}
	return nil
}

// Append adds ev as the next record, in tx (which must be an Update transaction), and
// returns the record. Nothing is written when it fails.
func Append(tx store.Tx, ev Event) (Record, error) {
	if err := checkEvent(ev); err != nil {
		return Record{}, err
	}
	h, err := readHead(tx)
	if err != nil {
		return Record{}, err
	}
	t := ev.Time
	if t.IsZero() {
		t = time.Now()
	}
	rec := Record{
		Seq:     h.Seq + 1,
		Time:    t.UTC().Round(0),
		Kind:    ev.Kind,
		Actor:   ev.Actor,
		Subject: ev.Subject,
		Prev:    h.Hash,
	}
	if len(ev.Details) > 0 {
		rec.Details = make(map[string]string, len(ev.Details))
		for k, v := range ev.Details {
			rec.Details[k] = v
		}
	}
	rec.Hash = hashRecord(rec)
	val, err := json.Marshal(rec)
	if err != nil {
		return Record{}, fmt.Errorf("audit: encode record %d: %w", rec.Seq, err)
	}
	hv, err := json.Marshal(head{Seq: rec.Seq, Hash: rec.Hash})
	if err != nil {
		return Record{}, fmt.Errorf("audit: encode head: %w", err)
	}
	if err := tx.Put(Bucket, seqKey(rec.Seq), val); err != nil {
		return Record{}, fmt.Errorf("audit: write record %d: %w", rec.Seq, err)
	}
	if err := tx.Put(HeadBucket, headKey, hv); err != nil {
		return Record{}, fmt.Errorf("audit: write head at record %d: %w", rec.Seq, err)
	}
	return rec, nil
}

// AppendReads names what Append reads (the head), for store.Prefetch in a transaction
// that appends.
func AppendReads() []store.Read { return []store.Read{store.Key(HeadBucket, headKey)} }

// Head returns the sequence number and hash of the last record (0 and "" for an empty
// log): the value to keep elsewhere to detect a rewrite of the whole log.
func Head(tx store.Tx) (seq uint64, hash string, err error) {
	h, err := readHead(tx)
	return h.Seq, h.Hash, err
}

func readHead(tx store.Tx) (head, error) {
	v, err := tx.Get(HeadBucket, headKey)
	if errors.Is(err, store.ErrNotFound) {
		return head{}, nil
	}
	if err != nil {
		return head{}, fmt.Errorf("audit: read head: %w", err)
	}
	var h head
	if err := json.Unmarshal(v, &h); err != nil {
		return head{}, &VerifyError{Seq: 0, Reason: fmt.Sprintf("the head entry is unreadable (%v); run audit verify and restore from a backup", err)}
	}
	return h, nil
}

// readBase returns the last pruned record's seq and hash (0, "" before any Prune).
func readBase(tx store.Tx) (head, error) {
	v, err := tx.Get(HeadBucket, baseKey)
	if errors.Is(err, store.ErrNotFound) {
		return head{}, nil
	}
	if err != nil {
		return head{}, fmt.Errorf("audit: read base: %w", err)
	}
	var b head
	if err := json.Unmarshal(v, &b); err != nil {
		return head{}, &VerifyError{Seq: 0, Reason: fmt.Sprintf("the base entry is unreadable (%v); restore from a backup", err)}
	}
	return b, nil
}

// Prune deletes the records up to and including upTo (at most MaxPrune records not yet
// pruned; call again for more) and appends a "prune" record by actor naming the new
// base. It returns how many records it deleted. The last record cannot be pruned.
func Prune(tx store.Tx, upTo uint64, actor string) (int, error) {
	h, err := readHead(tx)
	if err != nil {
		return 0, err
	}
	base, err := readBase(tx)
	if err != nil {
		return 0, err
	}
	if upTo >= h.Seq {
		return 0, fmt.Errorf("%w: prune through record %d: the log ends at %d and its last record stays", ErrInvalidEvent, upTo, h.Seq)
	}
	if upTo <= base.Seq {
		return 0, nil
	}
	if upTo-base.Seq > MaxPrune {
		upTo = base.Seq + MaxPrune
	}
	v, err := tx.Get(Bucket, seqKey(upTo))
	if err != nil {
		return 0, fmt.Errorf("audit: prune: read record %d: %w (run audit verify)", upTo, err)
	}
	last, err := decode(v)
	if err != nil || last.Seq != upTo {
		return 0, &VerifyError{Seq: upTo, Reason: "unreadable or moved; prune refused (run audit verify)"}
	}
	for seq := base.Seq + 1; seq <= upTo; seq++ {
		if err := tx.Delete(Bucket, seqKey(seq)); err != nil {
			return 0, fmt.Errorf("audit: prune record %d: %w", seq, err)
		}
	}
	bv, err := json.Marshal(head{Seq: upTo, Hash: last.Hash})
	if err != nil {
		return 0, fmt.Errorf("audit: encode base: %w", err)
	}
	if err := tx.Put(HeadBucket, baseKey, bv); err != nil {
		return 0, fmt.Errorf("audit: write base: %w", err)
	}
	_, err = Append(tx, Event{Kind: KindPrune, Actor: actor, Subject: fmt.Sprintf("1-%d", upTo), Details: map[string]string{
		"through": strconv.FormatUint(upTo, 10),
		"base":    last.Hash,
		"deleted": strconv.FormatUint(upTo-base.Seq, 10),
	}})
	if err != nil {
		return 0, err
	}
	return int(upTo - base.Seq), nil
}

// Verify checks the whole chain in tx and returns nil, or a *VerifyError (wrapping
// ErrTampered) naming the first record that was changed, removed or moved, or a store
// error.
func Verify(tx store.Tx) error {
	h, err := readHead(tx)
	if err != nil {
		return err
	}
	base, err := readBase(tx)
	if err != nil {
		return err
	}
	want := base.Seq + 1
	prev := base.Hash
	baseRecorded := base.Seq == 0
	err = tx.List(Bucket, "", func(key string, value []byte) error {
		keySeq, perr := strconv.ParseUint(key, 10, 64)
		if perr != nil || key != seqKey(keySeq) {
			return &VerifyError{Seq: want, Reason: fmt.Sprintf("unexpected entry %.40q in the log", key)}
		}
		if keySeq > want {
			return &VerifyError{Seq: want, Reason: fmt.Sprintf("removed (the log jumps to record %d)", keySeq)}
		}
		if keySeq < want {
			return &VerifyError{Seq: keySeq, Reason: fmt.Sprintf("present although the log was pruned through record %d", base.Seq)}
		}
		rec, derr := decode(value)
		if derr != nil {
			return &VerifyError{Seq: want, Reason: fmt.Sprintf("unreadable: %v", derr)}
		}
		if rec.Seq != keySeq {
			return &VerifyError{Seq: want, Reason: fmt.Sprintf("holds record %d: moved or reordered", rec.Seq)}
		}
		if rec.Prev != prev {
			return &VerifyError{Seq: want, Reason: "does not follow the record before it: a record before it was removed, changed or reordered"}
		}
		if hashRecord(rec) != rec.Hash {
			return &VerifyError{Seq: want, Reason: "changed: its content does not match its hash"}
		}
		if rec.Kind == KindPrune && rec.Details["through"] == strconv.FormatUint(base.Seq, 10) && rec.Details["base"] == base.Hash {
			baseRecorded = true
		}
		prev = rec.Hash
		want++
		return nil
	})
	if err != nil {
		return err
	}
	if !baseRecorded {
		return &VerifyError{Seq: base.Seq, Reason: "records up to here were removed without a prune record naming them"}
	}
	last := want - 1
	switch {
	case last < h.Seq:
		return &VerifyError{Seq: last + 1, Reason: fmt.Sprintf("removed: the log ends at record %d but its head names record %d", last, h.Seq)}
	case last > h.Seq:
		return &VerifyError{Seq: h.Seq + 1, Reason: fmt.Sprintf("added after the head (record %d)", h.Seq)}
	case prev != h.Hash:
		return &VerifyError{Seq: last, Reason: "changed: it does not match the hash kept in the head"}
	}
	return nil
}

// List returns up to limit records with a sequence number above after, in order; limit
// 0 means all.
func List(tx store.Tx, after uint64, limit int) ([]Record, error) {
	h, err := readHead(tx)
	if err != nil {
		return nil, err
	}
	base, err := readBase(tx)
	if err != nil {
		return nil, err
	}
	after = max(after, base.Seq)
	end := h.Seq
	if limit > 0 && after+uint64(limit) < end {
		end = after + uint64(limit)
	}
	var out []Record
	for seq := after + 1; seq <= end; seq++ {
		v, err := tx.Get(Bucket, seqKey(seq))
		if err != nil {
			return out, fmt.Errorf("audit: read record %d: %w (run audit verify)", seq, err)
		}
		rec, err := decode(v)
		if err != nil {
			return out, &VerifyError{Seq: seq, Reason: fmt.Sprintf("unreadable: %v", err)}
		}
		out = append(out, rec)
	}
	return out, nil
}

// Tail returns the last n records (fewer when the log is shorter), in order.
func Tail(tx store.Tx, n int) ([]Record, error) {
	seq, _, err := Head(tx)
	if err != nil {
		return nil, err
	}
	after := uint64(0)
	if n <= 0 {
		return nil, nil
	}
	if seq > uint64(n) {
		after = seq - uint64(n)
	}
	return List(tx, after, n)
}

// Decode parses a stored record; exported for tools that read the log's bucket directly.
func Decode(value []byte) (Record, error) { return decode(value) }

func decode(value []byte) (Record, error) {
	var rec Record
	if err := json.Unmarshal(value, &rec); err != nil {
		return Record{}, err
	}
	return rec, nil
}

func seqKey(seq uint64) string { return fmt.Sprintf("%020d", seq) }

// hashRecord returns the hex SHA-256 of the record's canonical form (everything but Hash):
// fixed-width integers and length-prefixed strings, details sorted by name.
func hashRecord(r Record) string {
	h := sha256.New()
	h.Write([]byte("nkp-audit-v1\x00"))
	var n [8]byte
	u64 := func(v uint64) {
		binary.BigEndian.PutUint64(n[:], v)
		h.Write(n[:])
	}
	str := func(s string) {
		u64(uint64(len(s)))
		h.Write([]byte(s))
	}
	u64(r.Seq)
	u64(uint64(r.Time.Unix()))
	u64(uint64(r.Time.Nanosecond()))
	str(string(r.Kind))
	str(r.Actor)
	str(r.Subject)
	names := make([]string, 0, len(r.Details))
	for k := range r.Details {
		names = append(names, k)
	}
	sort.Strings(names)
	u64(uint64(len(names)))
	for _, k := range names {
		str(k)
		str(r.Details[k])
	}
	str(r.Prev)
	return hex.EncodeToString(h.Sum(nil))
}
