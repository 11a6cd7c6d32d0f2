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
// It is refused while the provider is NotBackedUp, and for unknown or revoked hosts.
// Each release is recorded in the audit log before any key leaves: the record commits
// first, in a transaction shared with other releases running at the same time.
func (p *Provider) Release(ctx context.Context, hostID string) ([]ReleasedKDK, error) {
	r := &releaseReq{ctx: ctx, hostID: hostID, wake: make(chan bool, 1)}
	p.runRelease(ctx, r)
	if r.err != nil {
		p.log.Warn("release refused", "host_id", hostID, "err", r.err)
		return nil, fmt.Errorf("release to host %s: %w", hostID, r.err)
	}
	out, err := p.wrap(r)
	if err != nil {
		return nil, fmt.Errorf("release to host %s: %w", hostID, err)
	}
	return out, nil
}

// releaseReq is one Release waiting for its batch's transaction.
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

// commitReleases checks every request and appends its audit record, in one transaction.
// A request refused sets its own err; a failing transaction fails them all.
func (p *Provider) commitReleases(ctx context.Context, reqs []*releaseReq) error {
	return p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		kdks, err := listKDKs(tx)
		if err != nil {
			return err
		}
		var live []kdkRecord
		var versions []string
		for _, k := range kdks {
			if k.Retired == nil {
				live = append(live, k)
				versions = append(versions, strconv.Itoa(k.Version))
			}
		}
		notBackedUp := stateOf(kdks) == StateNotBackedUp
		for _, q := range reqs {
			q.err, q.kdks = nil, nil
			if notBackedUp {
				q.err = fmt.Errorf("%w: a KDK version is in no backup yet; take a backup first (`nkpctl provider backup`), then hosts get their keys", ErrNotBackedUp)
				continue
			}
			h, err := readHost(tx, q.hostID)
			if err != nil {
				q.err = err
				continue
			}
			if h.Revoked != nil {
				q.err = fmt.Errorf("host %s (%s): %w at %s", h.ID, h.Hostname, ErrHostRevoked, h.Revoked.Format(time.RFC3339))
				continue
			}
			form := "import_blob"
			if len(h.EKPublic) == 0 {
				if m.Policy.TPMRequired {
					q.err = fmt.Errorf("host %s (%s) has no TPM: %w; re-enroll it with its TPM or turn policy tpm-required off", h.ID, h.Hostname, ErrTPMRequired)
					continue
				}
				form = "bare"
			}
			if err := a.add(tx, audit.Event{Kind: audit.KindRelease, Actor: "host:" + h.ID, Subject: h.ID, Details: map[string]string{
				"hostname": h.Hostname, "kdk_versions": strings.Join(versions, ","), "form": form,
			}}); err != nil {
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
