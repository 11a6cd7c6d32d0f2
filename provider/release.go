package provider

import (
	"context"
	"crypto/x509"
	"fmt"
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
	// transaction holds at most 128 operations by default).
	maxReleaseBatch = 32
	// releaseCommitTimeout bounds one batch's transaction.
	releaseCommitTimeout = 30 * time.Second
)

// Release returns every live KDK version for the host: as import blobs for its TPM's
// endorsement key, or bare for a host without a TPM while policy tpm-required is off.
// It is refused while the provider is NotBackedUp, and for unknown or revoked hosts;
// every release reads the store, so a revocation or policy change applies at once.
//
// Audit: a release is recorded before any key leaves, in a transaction shared with other
// releases running at the same time. With Config.ReleaseAuditWindow > 0 (the default),
// a host fetching the same KDK versions again within the window is served without a new
// record; the next record for that host counts those repeats ("repeats_before"). A
// negative window records every single release.
func (p *Provider) Release(ctx context.Context, hostID string) ([]ReleasedKDK, error) {
	r, ok, err := p.releaseCovered(ctx, hostID)
	return p.finishRelease(ctx, hostID, r, ok, err)
}

// ReleaseTo is AuthorizeHost(cert) followed by Release of that host's KDKs, in one
// read of the store when the release is covered by an audited one (see Release): the
// host's record, the provider and the KDK versions come from one snapshot, taken after
// the call began, so a revocation, rotation or retirement committed on any replica
// before it is seen. The API's key fetch calls it; the caller wipes Bare.
func (p *Provider) ReleaseTo(ctx context.Context, cert *x509.Certificate) (Host, []ReleasedKDK, error) {
	if cert == nil {
		return Host{}, nil, fmt.Errorf("authorize host: no client certificate: %w", ErrHostUnknown)
	}
	hostID := cert.Subject.CommonName
	coverable := p.coverable(hostID)
	var a hostAuth
	var r *releaseReq
	var refused error
	err := p.st.View(ctx, func(tx store.Tx) error {
		reads := a.reads(cert)
		if coverable {
			reads = append(reads, releaseReads(hostID)...)
		}
		if err := store.Prefetch(tx, reads...); err != nil {
			return err
		}
		if err := a.read(tx, cert); err != nil {
			return err
		}
		r, refused = nil, nil
		if coverable && a.hostErr == nil {
			r, refused = releaseOf(tx, a.m, a.h)
		}
		return nil
	})
	if err != nil {
		return Host{}, nil, fmt.Errorf("authorize host: %w", err)
	}
	h, err := p.authorize(ctx, cert, a)
	if err != nil {
		return Host{}, nil, err
	}
	covered := false
	if refused == nil && r != nil {
		covered = p.covers(hostID, r)
	}
	out, err := p.finishRelease(ctx, hostID, r, covered, refused)
	if err != nil {
		return Host{}, nil, err
	}
	return h.public(), out, nil
}

// finishRelease completes a release whose read-only check gave r, ok and err (see
// releaseCovered): a refusal is returned, a covered release is served, and any other is
// recorded in the audit log before it is served.
func (p *Provider) finishRelease(ctx context.Context, hostID string, r *releaseReq, ok bool, err error) ([]ReleasedKDK, error) {
	if err != nil {
		p.log.Warn("release refused", "host_id", hostID, "err", err)
		return nil, fmt.Errorf("release to host %s: %w", hostID, err)
	}
	if !ok {
		r = &releaseReq{ctx: ctx, hostID: hostID, wake: make(chan bool, 1), repeats: p.takeRepeats(hostID)}
		p.runRelease(ctx, r)
		if r.err != nil {
			p.giveBackRepeats(hostID, r.repeats)
			p.log.Warn("release refused", "host_id", hostID, "err", r.err)
			return nil, fmt.Errorf("release to host %s: %w", hostID, r.err)
		}
		p.noteRecorded(hostID, r.set)
	}
	out, err := p.wrap(r)
	if err != nil {
		return nil, fmt.Errorf("release to host %s: %w", hostID, err)
	}
	return out, nil
}

// releaseSeen is what the audit log already holds about a host's releases.
type releaseSeen struct {
	set     string    // provider and KDK IDs of the last recorded release (keySet)
	at      time.Time // when it was recorded
	repeats int       // releases of the same versions since, not recorded one by one
}

// releaseCovered checks the release in a read-only view and reports whether a recorded
// release of the same versions within the audit window covers it (then the caller serves
// it without a write). A refusal is returned as err.
func (p *Provider) releaseCovered(ctx context.Context, hostID string) (*releaseReq, bool, error) {
	if !p.coverable(hostID) {
		return nil, false, nil
	}
	var r *releaseReq
	err := p.st.View(ctx, func(tx store.Tx) error {
		if err := store.Prefetch(tx, releaseReads(hostID)...); err != nil {
			return err
		}
		var err error
		r, err = releaseView(tx, hostID)
		return err
	})
	if err != nil {
		return nil, false, err
	}
	return r, p.covers(hostID, r), nil
}

// coverable reports whether a release to the host may be covered by one already in the
// audit log: the window is on and this replica recorded a release to it.
func (p *Provider) coverable(hostID string) bool {
	if p.cfg.ReleaseAuditWindow <= 0 {
		return false
	}
	p.seenMu.Lock()
	defer p.seenMu.Unlock()
	_, known := p.seen[hostID]
	return known
}

// releaseReads names what releaseView reads, for store.Prefetch.
func releaseReads(hostID string) []store.Read {
	return []store.Read{store.Key(bucketProvider, keyMeta), store.Range(bucketKDKs, ""), store.Key(bucketHosts, hostID)}
}

// releaseView checks a release to the host on tx; a refusal is returned as err.
func releaseView(tx store.Tx, hostID string) (*releaseReq, error) {
	m, kdks, err := releaseState(tx)
	if err != nil {
		return nil, err
	}
	h, _, err := checkRelease(tx, m, kdks, hostID)
	if err != nil {
		return nil, err
	}
	return newCovered(m, kdks, h), nil
}

// releaseOf is releaseView for a provider record m and host record h already read on tx
// (ReleaseTo read them to authorize the host), decoded once.
func releaseOf(tx store.Tx, m metaRecord, h hostRecord) (*releaseReq, error) {
	kdks, err := listKDKs(tx)
	if err != nil {
		return nil, err
	}
	if err := checkBackedUp(kdks); err != nil {
		return nil, err
	}
	if _, err := checkHost(m, h); err != nil {
		return nil, err
	}
	return newCovered(m, kdks, h), nil
}

// newCovered is the release of the live versions of kdks to h, checked read-only.
func newCovered(m metaRecord, kdks []kdkRecord, h hostRecord) *releaseReq {
	r := &releaseReq{hostID: h.ID, providerID: m.ID, host: h, kdks: liveKDKs(kdks), versions: versionList(kdks)}
	r.set = keySet(m.ID, r.kdks)
	return r
}

// covers reports whether a release of r's versions to the host, recorded within the
// audit window, covers r; if so it counts r as one more repeat.
func (p *Provider) covers(hostID string, r *releaseReq) bool {
	now := p.now()
	p.seenMu.Lock()
	defer p.seenMu.Unlock()
	s, ok := p.seen[hostID]
	if !ok || s.set != r.set || now.Sub(s.at) >= p.cfg.ReleaseAuditWindow || now.Before(s.at) {
		return false
	}
	s.repeats++
	return true
}

// takeRepeats returns and clears the count of unrecorded repeats for the host.
func (p *Provider) takeRepeats(hostID string) int {
	p.seenMu.Lock()
	defer p.seenMu.Unlock()
	s, ok := p.seen[hostID]
	if !ok {
		return 0
	}
	n := s.repeats
	s.repeats = 0
	return n
}

// giveBackRepeats restores a count taken for a release that was not recorded.
func (p *Provider) giveBackRepeats(hostID string, n int) {
	if n == 0 {
		return
	}
	p.seenMu.Lock()
	defer p.seenMu.Unlock()
	if s, ok := p.seen[hostID]; ok {
		s.repeats += n
	}
}

// noteRecorded remembers that a release of the key set to the host is in the audit log.
func (p *Provider) noteRecorded(hostID, set string) {
	if p.cfg.ReleaseAuditWindow <= 0 {
		return
	}
	p.seenMu.Lock()
	defer p.seenMu.Unlock()
	s, ok := p.seen[hostID]
	if !ok {
		s = &releaseSeen{}
		p.seen[hostID] = s
	}
	s.set, s.at = set, p.now()
}

// releaseReq is one Release waiting for its batch's transaction.
type releaseReq struct {
	ctx    context.Context
	hostID string
	wake   chan bool // true: lead the next batch; false: the batch that held it is done
	// Results, set by the batch leader before wake.
	repeats    int // unrecorded releases of the same versions before this one
	err        error
	providerID string
	host       hostRecord
	kdks       []kdkRecord // live versions
	versions   string      // their numbers, "1,2"
	set        string      // keySet of the provider and kdks
}

// batcher groups concurrent releases: the first caller leads and commits every request
// that arrived meanwhile in one transaction, then hands the lead to the next waiting one.
type batcher struct {
	mu sync.Mutex
	// Guarded by mu.
	busy    bool
	pending []*releaseReq
}

func (p *Provider) runRelease(ctx context.Context, r *releaseReq) {
	b := &p.rel
	b.mu.Lock()
	b.pending = append(b.pending, r)
	if b.busy {
		b.mu.Unlock()
		if lead := <-r.wake; !lead {
			return
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
}

// releaseState reads what every release check needs.
func releaseState(tx store.Tx) (metaRecord, []kdkRecord, error) {
	m, err := readMeta(tx)
	if err != nil {
		return m, nil, err
	}
	kdks, err := listKDKs(tx)
	return m, kdks, err
}

// checkRelease decides whether host hostID may have the KDKs now; it returns the host
// and the form its keys take ("import_blob" or "bare").
func checkRelease(tx store.Tx, m metaRecord, kdks []kdkRecord, hostID string) (hostRecord, string, error) {
	if err := checkBackedUp(kdks); err != nil {
		return hostRecord{}, "", err
	}
	h, err := readHost(tx, hostID)
	if err != nil {
		return h, "", err
	}
	form, err := checkHost(m, h)
	return h, form, err
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

// keySet names what a release hands out: the provider and its live KDK IDs.
func keySet(providerID string, live []kdkRecord) string {
	ids := make([]string, 0, len(live)+1)
	ids = append(ids, providerID)
	for _, k := range live {
		ids = append(ids, k.ID)
	}
	return strings.Join(ids, ",")
}

func versionList(kdks []kdkRecord) string {
	var v []string
	for _, k := range kdks {
		if k.Retired == nil {
			v = append(v, strconv.Itoa(k.Version))
		}
	}
	return strings.Join(v, ",")
}

// commitReleases checks every request and appends its audit record, in one transaction.
// A request refused sets its own err; a failing transaction fails them all.
func (p *Provider) commitReleases(ctx context.Context, reqs []*releaseReq) error {
	return p.update(ctx, func(tx store.Tx, a *auditor) error {
		reads := append([]store.Read{store.Key(bucketProvider, keyMeta), store.Range(bucketKDKs, "")}, audit.AppendReads()...)
		for _, q := range reqs {
			reads = append(reads, store.Key(bucketHosts, q.hostID))
		}
		if err := store.Prefetch(tx, reads...); err != nil {
			return err
		}
		m, kdks, err := releaseState(tx)
		if err != nil {
			return err
		}
		live, versions := liveKDKs(kdks), versionList(kdks)
		for _, q := range reqs {
			q.err, q.kdks = nil, nil
			h, form, err := checkRelease(tx, m, kdks, q.hostID)
			if err != nil {
				q.err = err
				continue
			}
			details := map[string]string{"hostname": h.Hostname, "kdk_versions": versions, "form": form}
			if q.repeats > 0 {
				details["repeats_before"] = strconv.Itoa(q.repeats)
			}
			if err := a.add(tx, audit.Event{Kind: audit.KindRelease, Actor: "host:" + h.ID, Subject: h.ID, Details: details}); err != nil {
				return err
			}
			q.providerID, q.host, q.kdks, q.versions, q.set = m.ID, h, live, versions, keySet(m.ID, live)
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
