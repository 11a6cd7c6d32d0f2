package provider

import (
	"context"
	"fmt"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
)

// AuditPrune describes a pruning of the audit log.
type AuditPrune struct {
	// Through is the last record deleted (or, for a dry run, that would be); 0 = none.
	Through uint64
	// Deleted counts the records deleted (or that would be).
	Deleted int
	// Anchor is the audit record the newest confirmed backup recorded: it and every later
	// record are kept.
	Anchor uint64
	// DryRun: nothing was deleted.
	DryRun bool
}

// pruneScan bounds the records read per transaction while looking for the prune point.
const pruneScan = 1024

// PruneAudit deletes the oldest audit records, those dated before before, and appends a
// "prune" record naming the last one deleted, so `audit verify` still passes and still
// detects any other removal (provider/audit.Prune). Records from the audit head recorded
// in the newest confirmed backup on are never deleted: a request reaching them is refused
// with ErrNotBackedUp (take a backup first), as is any prune before a confirmed backup
// recorded the log. With dryRun nothing changes and the result says what would go.
func (p *Provider) PruneAudit(ctx context.Context, before time.Time, dryRun bool) (AuditPrune, error) {
	if before.IsZero() {
		return AuditPrune{}, fmt.Errorf("audit prune: %w: give the time before which records go (--before)", ErrBadRequest)
	}
	var res AuditPrune
	var base uint64
	err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		res.Anchor = m.BackupAuditSeq
		first, err := audit.List(tx, 0, 1)
		if err != nil || len(first) == 0 {
			return err
		}
		base = first[0].Seq - 1
		return nil
	})
	if err != nil {
		return AuditPrune{}, fmt.Errorf("audit prune: %w", err)
	}
	if res.Anchor == 0 {
		return AuditPrune{}, fmt.Errorf("audit prune: %w: no confirmed backup has recorded this audit log yet; take a backup (`nkpctl provider backup`), then prune", ErrNotBackedUp)
	}
	// The prune point: the last of the oldest records that are all dated before `before`.
	upTo, next := base, base
	for done := false; !done; {
		err := p.st.View(ctx, func(tx store.Tx) error {
			recs, err := audit.List(tx, next, pruneScan)
			if err != nil {
				return err
			}
			for _, r := range recs {
				if !r.Time.Before(before) {
					done = true
					return nil
				}
				upTo = r.Seq
			}
			next += uint64(len(recs))
			done = len(recs) < pruneScan
			return nil
		})
		if err != nil {
			return AuditPrune{}, fmt.Errorf("audit prune: %w", err)
		}
	}
	if upTo >= res.Anchor {
		return AuditPrune{}, fmt.Errorf("audit prune before %s: %w: records %d to %d are older, but only records before %d may go: "+
			"the newest confirmed backup recorded the log up to record %d (kept as its anchor) and later records are in no confirmed backup; "+
			"take a backup first, or give an earlier --before",
			before.UTC().Format(time.RFC3339Nano), ErrNotBackedUp, base+1, upTo, res.Anchor, res.Anchor)
	}
	res.Through, res.Deleted, res.DryRun = upTo, int(upTo-base), dryRun
	if dryRun || upTo == base {
		if upTo == base {
			res.Through = 0
		}
		return res, nil
	}
	actor := actorOf(ctx)
	start := base
	for base < upTo {
		var n int
		err := p.st.Update(ctx, func(tx store.Tx) error {
			m, err := readMeta(tx)
			if err != nil {
				return err
			}
			if m.BackupAuditSeq <= upTo {
				return fmt.Errorf("%w: the provider was restored during the prune, record %d is in no confirmed backup now; take a backup, then prune again", ErrNotBackedUp, upTo)
			}
			n, err = audit.Prune(tx, upTo, actor)
			return err
		})
		if err != nil {
			return AuditPrune{}, fmt.Errorf("audit prune through record %d (%d of %d deleted so far; the log stays verifiable): %w", upTo, base-start, res.Deleted, err)
		}
		if n == 0 {
			return AuditPrune{}, fmt.Errorf("audit prune through record %d: no progress after record %d; run `nkpctl provider audit verify`", upTo, base)
		}
		base += uint64(n)
	}
	p.log.Info("audit log pruned", "through", upTo, "deleted", res.Deleted, "anchor", res.Anchor, "actor", actor)
	return res, nil
}
