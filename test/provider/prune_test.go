package provider_test

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
)

// TestAuditPrune: `nkpctl provider audit prune` refuses before a backup and past the
// newest confirmed backup's anchor, shows what would go without --yes, deletes with it,
// and `audit verify` still passes.
func TestAuditPrune(t *testing.T) {
	b := build(t)
	dir, s := b.running(t)
	far := time.Now().Add(24 * time.Hour).UTC().Format(time.RFC3339)
	if _, err := b.ctl(t, dir, s.url, "", "audit", "prune", "--before", far, "--yes"); err == nil || !strings.Contains(err.Error(), apiv1.CodeNotBackedUp) {
		t.Fatalf("prune before any backup: %v, want %s", err, apiv1.CodeNotBackedUp)
	}
	if _, err := b.ctl(t, dir, s.url, "", "audit", "prune"); err == nil || !strings.Contains(err.Error(), "--before") {
		t.Fatalf("prune without --before: %v, want a refusal naming --before", err)
	}
	for range 3 {
		b.token(t, s, "10m")
	}
	pass := writeFile(t, filepath.Join(t.TempDir(), "p"), "pw: correct horse battery\n")
	b.mustCtl(t, dir, s.url, "", "backup", "--passphrase-file", pass, "--out", filepath.Join(t.TempDir(), "b.age"))
	b.token(t, s, "10m")

	var recs []apiv1.AuditRecord
	b.ctlJSON(t, dir, s.url, &recs, "audit", "-n", "0")
	var anchor apiv1.AuditRecord
	for i, r := range recs {
		if r.Kind == "backup" && r.Details["stage"] == "written" {
			anchor = recs[i-1] // the backup recorded the head before its own record
		}
	}
	if anchor.Seq < 3 {
		t.Fatalf("no backup record after a few records in %+v", recs)
	}
	if _, err := b.ctl(t, dir, s.url, "", "audit", "prune", "--before", far, "--yes"); err == nil ||
		!strings.Contains(err.Error(), apiv1.CodeNotBackedUp) || !strings.Contains(err.Error(), "take a backup first") {
		t.Fatalf("prune past the backup's anchor: %v, want %s with the way out", err, apiv1.CodeNotBackedUp)
	}
	before := anchor.Time.Format(time.RFC3339Nano)
	out := b.mustCtl(t, dir, s.url, "", "audit", "prune", "--before", before)
	if !strings.Contains(out, "would delete") {
		t.Fatalf("dry run printed %q", out)
	}
	var again []apiv1.AuditRecord
	b.ctlJSON(t, dir, s.url, &again, "audit", "-n", "0")
	if len(again) != len(recs) || again[0].Seq != 1 {
		t.Fatalf("the dry run changed the log: %d records from %d, had %d from 1", len(again), again[0].Seq, len(recs))
	}
	var res apiv1.AuditPruneResponse
	b.ctlJSON(t, dir, s.url, &res, "audit", "prune", "--before", before, "--yes")
	if res.DryRun || res.Deleted < 2 || res.Through >= anchor.Seq || res.Anchor != anchor.Seq {
		t.Fatalf("prune = %+v, want records deleted below the anchor %d", res, anchor.Seq)
	}
	b.ctlJSON(t, dir, s.url, &again, "audit", "-n", "0")
	if again[0].Seq != res.Through+1 || again[len(again)-1].Kind != "prune" || again[len(again)-1].Actor != "admin:admin" {
		t.Fatalf("after the prune the log runs %d..%d ending with %+v; want it to start at %d and end with the prune",
			again[0].Seq, again[len(again)-1].Seq, again[len(again)-1], res.Through+1)
	}
	if out := b.mustCtl(t, dir, s.url, "", "audit", "verify"); !strings.Contains(out, "chain intact") {
		t.Fatalf("audit verify after the prune: %q", out)
	}
}
