package provider

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm-tools/server"
	"google.golang.org/protobuf/proto"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
)

// Release limits.
const (
	// maxReleaseBatch bounds how many concurrent releases share one transaction (an etcd
	// transaction holds at most 128 operations by default; each release adds its host's
	// read and an audit record).
	maxReleaseBatch = 32
	// releaseCommitTimeout bounds one batch's transaction.
	releaseCommitTimeout = 30 * time.Second
)

// CheckRelease is the read-only half of a key fetch: it authorizes the host's
// certificate (as AuthorizeHost) and decides whether the host may have its KDKs now (as
// ReleaseTo would), in one read of the store, and returns the host and the key set it
// would get. The key set names the provider and its live KDK versions; a host that holds
// that set already needs no keys, so nothing leaves and nothing is audited. On etcd this
// is one linearizable request, so a revocation, rotation or retirement committed on any
// replica before the call is seen.
func (p *Provider) CheckRelease(ctx context.Context, cert *x509.Certificate) (Host, string, error) {
	if cert == nil {
		return Host{}, "", fmt.Errorf("authorize host: no client certificate: %w", ErrHostUnknown)
	}
	var a hostAuth
	var kdks []kdkRecord
	err := p.st.View(ctx, func(tx store.Tx) error {
		if err := store.Prefetch(tx, append(a.reads(cert), store.Range(bucketKDKs, ""))...); err != nil {
			return err
		}
		if err := a.read(tx, cert); err != nil {
			return err
		}
		var err error
		kdks, err = listKDKs(tx)
		return err
	})
	if err != nil {
		return Host{}, "", fmt.Errorf("authorize host: %w", err)
	}
	h, err := p.authorize(ctx, cert, a)
	if err != nil {
		return Host{}, "", err
	}
	if err := checkBackedUp(kdks); err != nil {
		return Host{}, "", fmt.Errorf("release to host %s: %w", h.ID, err)
	}
	if _, err := checkHost(a.m, h); err != nil {
		return Host{}, "", fmt.Errorf("release to host %s: %w", h.ID, err)
	}
	return h.public(), keySet(a.m.ID, liveKDKs(kdks)), nil
}

// ReleaseTo authorizes the host's certificate (AuthorizeHost) and releases every live KDK
// version to it: as import blobs for its TPM's endorsement key, or bare for a host
// without a TPM while policy tpm-required is off. It is refused while the provider is
// NotBackedUp, and for unknown or revoked hosts. Every release is checked again and
// recorded in the audit log, in a transaction shared with the releases running at the
// same time (group commit), before any key leaves. It returns the host, the keys (the
// caller wipes Bare) and their key set (see CheckRelease).
func (p *Provider) ReleaseTo(ctx context.Context, cert *x509.Certificate) (Host, []ReleasedKDK, string, error) {
	h, err := p.AuthorizeHost(ctx, cert)
	if err != nil {
		return Host{}, nil, "", err
	}
	out, set, err := p.release(ctx, h.ID)
	if err != nil {
		return Host{}, nil, "", err
	}
	return h, out, set, nil
}

// release records a release to host hostID (group commit) and wraps its keys.
func (p *Provider) release(ctx context.Context, hostID string) ([]ReleasedKDK, string, error) {
	r := &releaseReq{ctx: ctx, hostID: hostID, wake: make(chan bool, 1)}
	if err := p.runRelease(ctx, r); err != nil {
		return nil, "", fmt.Errorf("release to host %s: %w", hostID, err)
	}
	if r.err != nil {
		p.log.Warn("release refused", "host_id", hostID, "err", r.err)
		return nil, "", fmt.Errorf("release to host %s: %w", hostID, r.err)
	}
	out, err := p.wrap(r)
	if err != nil {
		return nil, "", fmt.Errorf("release to host %s: %w", hostID, err)
	}
	return out, keySet(r.providerID, r.kdks), nil
}

// releaseReq is one release waiting for its batch's transaction.
type releaseReq struct {
	ctx    context.Context
	hostID string
	wake   chan bool // true: lead the next batch; false: the batch that held it is done
	// Results, set by the batch leader before wake.
	err        error
	providerID string
	host       hostRecord
	kdks       []kdkRecord // live versions
}

// batcher groups concurrent releases (group commit): the first caller leads and commits
// every request that arrived meanwhile in one transaction, then hands the lead to the
// next waiting one. Every release writes an audit record, and audit records form one
// hash chain, so releases committed one by one would queue for the chain's head (bbolt:
// two fsyncs each; etcd: a raft round each, and conflicts on the head); a batch pays that
// once.
type batcher struct {
	mu sync.Mutex
	// Guarded by mu.
	busy    bool
	pending []*releaseReq
}

// runRelease commits r with the releases waiting beside it. It returns ctx's error if
// ctx ends while r waits for its turn (r is then dropped from the queue, or, if its batch
// is already committing, its result is ignored); otherwise r.err holds the outcome.
func (p *Provider) runRelease(ctx context.Context, r *releaseReq) error {
	b := &p.rel
	b.mu.Lock()
	b.pending = append(b.pending, r)
	if b.busy {
		b.mu.Unlock()
		select {
		case lead := <-r.wake:
			if !lead {
				return nil
			}
		case <-ctx.Done():
			b.mu.Lock()
			if i := slices.Index(b.pending, r); i >= 0 {
				b.pending = slices.Delete(b.pending, i, i+1)
				b.mu.Unlock()
				return ctx.Err()
			}
			b.mu.Unlock()
			// r was taken into a batch, or handed the lead: a lead must be taken up, or
			// the requests behind it would wait forever.
			if lead := <-r.wake; !lead {
				return ctx.Err()
			}
		}
		b.mu.Lock()
	} else {
		b.busy = true
	}
	n := min(len(b.pending), maxReleaseBatch)
	batch := b.pending[:n:n]
	b.pending = b.pending[n:]
	b.mu.Unlock()

	live := make([]*releaseReq, 0, len(batch))
	for _, q := range batch {
		if err := q.ctx.Err(); err != nil {
			q.err = err
			continue
		}
		live = append(live, q)
	}
	if len(live) > 0 {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), releaseCommitTimeout)
		if err := p.commitReleases(cctx, live); err != nil {
			for _, q := range live {
				q.err = err
			}
		}
		cancel()
	}

	b.mu.Lock()
	if len(b.pending) > 0 {
		b.pending[0].wake <- true
	} else {
		b.busy = false
	}
	b.mu.Unlock()
	for _, q := range batch {
		if q != r {
			q.wake <- false
		}
	}
	return nil
}

// releaseReads names what commitReleases reads for the hosts, for store.Prefetch (one
// etcd request instead of one per key).
func releaseReads(hostIDs []string) []store.Read {
	reads := append([]store.Read{store.Key(bucketProvider, keyMeta), store.Range(bucketKDKs, "")}, audit.AppendReads()...)
	for _, id := range hostIDs {
		reads = append(reads, store.Key(bucketHosts, id))
	}
	return reads
}

// checkBackedUp refuses every release while a live KDK version is in no confirmed backup.
func checkBackedUp(kdks []kdkRecord) error {
	if stateOf(kdks) == StateNotBackedUp {
		return fmt.Errorf("%w: a KDK version is in no confirmed backup yet; take a backup first (`nkpctl provider backup` saves the archive, opens it again and confirms it), then hosts get their keys", ErrNotBackedUp)
	}
	return nil
}

// checkHost decides whether host h may have keys under the provider's policy, and in
// which form.
func checkHost(m metaRecord, h hostRecord) (string, error) {
	if h.Revoked != nil {
		return "", fmt.Errorf("host %s (%s): %w at %s", h.ID, h.Hostname, ErrHostRevoked, h.Revoked.Format(time.RFC3339))
	}
	if len(h.EKPublic) > 0 {
		return "import_blob", nil
	}
	if m.Policy.TPMRequired {
		return "", fmt.Errorf("host %s (%s) has no TPM: %w; re-enroll it with its TPM or turn policy tpm-required off", h.ID, h.Hostname, ErrTPMRequired)
	}
	return "bare", nil
}

func liveKDKs(kdks []kdkRecord) []kdkRecord {
	var live []kdkRecord
	for _, k := range kdks {
		if k.Retired == nil {
			live = append(live, k)
		}
	}
	return live
}

// keySet names what a release hands out: 32 hex digits of the SHA-256 of the provider ID
// and its live KDK IDs. It changes when a version is added or retired, or the store holds
// another provider.
func keySet(providerID string, live []kdkRecord) string {
	ids := make([]string, 0, len(live)+1)
	ids = append(ids, providerID)
	for _, k := range live {
		ids = append(ids, k.ID)
	}
	sum := sha256.Sum256([]byte(strings.Join(ids, ",")))
	return hex.EncodeToString(sum[:16])
}

func versionList(kdks []kdkRecord) string {
	v := make([]string, 0, len(kdks))
	for _, k := range kdks {
		v = append(v, strconv.Itoa(k.Version))
	}
	return strings.Join(v, ",")
}

// commitReleases checks every request and appends its audit record, in one transaction.
// A request refused sets its own err; a failing transaction fails them all.
func (p *Provider) commitReleases(ctx context.Context, reqs []*releaseReq) error {
	ids := make([]string, len(reqs))
	for i, q := range reqs {
		ids[i] = q.hostID
	}
	return p.update(ctx, func(tx store.Tx, a *auditor) error {
		if err := store.Prefetch(tx, releaseReads(ids)...); err != nil {
			return err
		}
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		live := liveKDKs(kdks)
		versions := versionList(live)
		for _, q := range reqs {
			q.err, q.kdks = nil, nil
			if q.err = checkBackedUp(kdks); q.err != nil {
				continue
			}
			h, err := readHost(tx, q.hostID)
			if err != nil {
				q.err = err
				continue
			}
			form, err := checkHost(m, h)
			if err != nil {
				q.err = err
				continue
			}
			details := map[string]string{"hostname": h.Hostname, "kdk_versions": versions, "form": form}
			if err := a.add(tx, audit.Event{Kind: audit.KindRelease, Actor: "host:" + h.ID, Subject: h.ID, Details: details}); err != nil {
				return err
			}
			q.providerID, q.host, q.kdks = m.ID, h, live
		}
		return nil
	})
}

// wrap decrypts the request's KDKs and wraps each for the host.
func (p *Provider) wrap(r *releaseReq) (out []ReleasedKDK, err error) {
	defer func() {
		if err != nil {
			for i := range out {
				out[i].Wipe()
			}
			out = nil
		}
	}()
	var ek any
	if len(r.host.EKPublic) > 0 {
		if ek, err = x509.ParsePKIXPublicKey(r.host.EKPublic); err != nil {
			return nil, fmt.Errorf("host %s: stored EK public is unreadable (%v); re-enroll the host", r.host.ID, err)
		}
	}
	for _, k := range r.kdks {
		key, err := p.openKDK(r.providerID, k)
		if err != nil {
			return out, err
		}
		rel := ReleasedKDK{ID: k.ID, Version: k.Version, Primary: k.Primary}
		if ek == nil {
			rel.Bare = key
			out = append(out, rel)
			continue
		}
		blob, err := server.CreateImportBlob(ek, key, nil)
		clear(key)
		if err != nil {
			return out, fmt.Errorf("wrapping KDK version %d for the TPM of host %s: %w", k.Version, r.host.ID, err)
		}
		if rel.ImportBlob, err = proto.Marshal(blob); err != nil {
			return out, fmt.Errorf("encoding the import blob of KDK version %d: %w", k.Version, err)
		}
		out = append(out, rel)
	}
	return out, nil
}
