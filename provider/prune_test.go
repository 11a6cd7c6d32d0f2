package provider_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
)

// TestPruneAudit: the audit log is pruned only by date and only below the audit head of
// the newest confirmed backup, and stays verifiable.
func TestPruneAudit(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{}) // record 1 at T0
	t0 := e.clock.Now()
	hour := func(h int) time.Time { return t0.Add(time.Duration(h) * time.Hour) }
	if _, err := e.p.PruneAudit(ctx, hour(10), false); !errors.Is(err, provider.ErrNotBackedUp) {
		t.Fatalf("prune before any backup: %v, want ErrNotBackedUp", err)
	}
	for range 2 { // records 2 and 3, at T0+1h and T0+2h
		e.clock.Advance(time.Hour)
		if _, err := e.p.CreateToken(ctx, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	e.clock.Advance(time.Hour)
	archive := e.backup(t, "pw: correct horse battery") // records 4 (written, head 3) and 5 (confirmed), anchor 3

	steps := []struct {
		name       string
		before     time.Time
		dryRun     bool
		backup     bool // take a backup first
		wantErr    error
		wantThru   uint64
		wantDel    int
		wantFirst  uint64 // first record left
		wantAnchor uint64
	}{
		{name: "no time", wantErr: provider.ErrBadRequest, wantFirst: 1},
		{name: "dry run", before: hour(1).Add(time.Second), dryRun: true, wantThru: 2, wantDel: 2, wantFirst: 1, wantAnchor: 3},
		{name: "into the anchor", before: hour(2).Add(time.Second), wantErr: provider.ErrNotBackedUp, wantFirst: 1},
		{name: "everything", before: hour(100), wantErr: provider.ErrNotBackedUp, wantFirst: 1},
		{name: "up to the anchor", before: hour(1).Add(time.Second), wantThru: 2, wantDel: 2, wantFirst: 3, wantAnchor: 3},
		{name: "again: nothing left", before: hour(1).Add(time.Second), wantDel: 0, wantFirst: 3, wantAnchor: 3},
		{name: "after another backup", before: hour(2).Add(time.Second), backup: true, wantThru: 3, wantDel: 1, wantFirst: 4, wantAnchor: 6},
	}
	for _, st := range steps {
		if st.backup {
			e.backup(t, "pw: correct horse battery") // head 6 (prune record) is the new anchor
		}
		got, err := e.p.PruneAudit(ctx, st.before, st.dryRun)
		if !errors.Is(err, st.wantErr) || (err == nil) != (st.wantErr == nil) {
			t.Fatalf("%s: PruneAudit = %+v, %v; want %v", st.name, got, err, st.wantErr)
		}
		if err == nil && (got.Through != st.wantThru || got.Deleted != st.wantDel || got.Anchor != st.wantAnchor || got.DryRun != st.dryRun) {
			t.Fatalf("%s: PruneAudit = %+v, want through %d, %d deleted, anchor %d", st.name, got, st.wantThru, st.wantDel, st.wantAnchor)
		}
		if err := e.p.AuditVerify(ctx); err != nil {
			t.Fatalf("%s: audit verify after the prune: %v", st.name, err)
		}
		recs, err := e.p.Audit(ctx, 1000)
		if err != nil || len(recs) == 0 || recs[0].Seq != st.wantFirst {
			t.Fatalf("%s: the log starts at %+v, %v; want record %d", st.name, recs[:min(1, len(recs))], err, st.wantFirst)
		}
		if err == nil && !st.dryRun && st.wantDel > 0 {
			last := recs[len(recs)-1]
			if last.Kind != audit.KindPrune || last.Actor != "admin" {
				t.Fatalf("%s: last record %+v, want the prune", st.name, last)
			}
		}
	}

	// A restored provider has no confirmed backup of its own log yet.
	dst := newEnv(t)
	if _, err := dst.p.Restore(ctx, bytes.NewReader(archive), []byte("pw: correct horse battery"), false); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.p.PruneAudit(ctx, hour(100), false); !errors.Is(err, provider.ErrNotBackedUp) {
		t.Fatalf("prune on a restored provider: %v, want ErrNotBackedUp", err)
	}
}

// TestPruneAuditLong prunes more records than one scan (1024) and one audit.Prune call
// (audit.MaxPrune) cover.
func TestPruneAuditLong(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	n := audit.MaxPrune + 100
	for range n {
		if _, err := e.p.CreateToken(ctx, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	e.clock.Advance(time.Minute)
	if _, err := e.p.CreateToken(ctx, time.Hour); err != nil { // the record the backup anchors
		t.Fatal(err)
	}
	e.backup(t, "pw: correct horse battery")
	got, err := e.p.PruneAudit(ctx, e.clock.Now(), false)
	if err != nil || got.Deleted != n+1 || got.Through != uint64(n+1) {
		t.Fatalf("PruneAudit = %+v, %v; want %d records deleted", got, err, n+1)
	}
	if err := e.p.AuditVerify(ctx); err != nil {
		t.Fatalf("audit verify after a long prune: %v", err)
	}
	recs, err := e.p.Audit(ctx, 10)
	if err != nil || len(recs) != 5 || recs[0].Kind != audit.KindToken || recs[1].Kind != audit.KindBackup || recs[4].Kind != audit.KindPrune {
		t.Fatalf("left after the prune: %+v, %v; want the anchored token record, the 2 backup records and 2 prune records", recs, err)
	}
}
