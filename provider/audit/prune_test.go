package audit_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
)

func prune(s store.Store, upTo uint64) (int, error) {
	var n int
	err := s.Update(context.Background(), func(tx store.Tx) (err error) {
		n, err = audit.Prune(tx, upTo, "admin:ops")
		return err
	})
	return n, err
}

func seqs(t *testing.T, s store.Store) []uint64 {
	t.Helper()
	var out []uint64
	err := s.View(context.Background(), func(tx store.Tx) error {
		recs, err := audit.List(tx, 0, 0)
		for _, r := range recs {
			out = append(out, r.Seq)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestPrune(t *testing.T) {
	steps := []struct {
		upTo      uint64
		deleted   int
		wantSeqs  string
		wantError bool
	}{
		{upTo: 4, deleted: 4, wantSeqs: "[5 6 7 8 9 10 11]"},
		{upTo: 3, deleted: 0, wantSeqs: "[5 6 7 8 9 10 11]"},
		{upTo: 7, deleted: 3, wantSeqs: "[8 9 10 11 12]"},
		{upTo: 12, wantError: true, wantSeqs: "[8 9 10 11 12]"},
	}
	s := logOf(t, 10)
	for _, st := range steps {
		n, err := prune(s, st.upTo)
		if st.wantError != (err != nil) || n != st.deleted {
			t.Fatalf("Prune(%d) = %d, %v; want %d deleted, error %v", st.upTo, n, err, st.deleted, st.wantError)
		}
		if got := fmt.Sprint(seqs(t, s)); got != st.wantSeqs {
			t.Fatalf("after Prune(%d) the log holds %s, want %s", st.upTo, got, st.wantSeqs)
		}
		if err := verify(s); err != nil {
			t.Fatalf("after Prune(%d): %v", st.upTo, err)
		}
	}
	var last audit.Record
	_ = s.View(context.Background(), func(tx store.Tx) error {
		recs, err := audit.Tail(tx, 1)
		if err == nil {
			last = recs[0]
		}
		return err
	})
	if last.Kind != audit.KindPrune || last.Details["through"] != "7" || last.Details["deleted"] != "3" || last.Actor != "admin:ops" {
		t.Fatalf("last record %+v, want the prune through 7", last)
	}
}

func TestPruneBounded(t *testing.T) {
	s := logOf(t, audit.MaxPrune+10)
	n, err := prune(s, audit.MaxPrune+5)
	if err != nil || n != audit.MaxPrune {
		t.Fatalf("Prune = %d, %v; want %d", n, err, audit.MaxPrune)
	}
	if err := verify(s); err != nil {
		t.Fatal(err)
	}
}

// Removing old records without Prune, even with a forged base, is detected.
func TestPruneForgery(t *testing.T) {
	key := func(seq int) string { return fmt.Sprintf("%020d", seq) }
	cases := []struct {
		name    string
		edit    func(tx store.Tx) error
		wantSeq uint64
	}{
		{"records removed and base forged", func(tx store.Tx) error {
			v, _ := tx.Get(audit.Bucket, key(4))
			r, _ := audit.Decode(v)
			for i := 1; i <= 4; i++ {
				_ = tx.Delete(audit.Bucket, key(i))
			}
			b, _ := json.Marshal(map[string]any{"seq": 4, "hash": r.Hash})
			return tx.Put(audit.HeadBucket, "base", b)
		}, 4},
		{"pruned record put back", func(tx store.Tx) error {
			if _, err := audit.Prune(tx, 3, "x"); err != nil {
				return err
			}
			return tx.Put(audit.Bucket, key(2), []byte(`{"seq":2}`))
		}, 2},
		{"base moved past the prune", func(tx store.Tx) error {
			if _, err := audit.Prune(tx, 3, "x"); err != nil {
				return err
			}
			v, _ := tx.Get(audit.Bucket, key(5))
			r, _ := audit.Decode(v)
			_ = tx.Delete(audit.Bucket, key(4))
			_ = tx.Delete(audit.Bucket, key(5))
			b, _ := json.Marshal(map[string]any{"seq": 5, "hash": r.Hash})
			return tx.Put(audit.HeadBucket, "base", b)
		}, 5},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := logOf(t, 8)
			if err := s.Update(context.Background(), c.edit); err != nil {
				t.Fatal(err)
			}
			err := verify(s)
			var ve *audit.VerifyError
			if !errors.As(err, &ve) || ve.Seq != c.wantSeq {
				t.Fatalf("Verify = %v, want a VerifyError at record %d", err, c.wantSeq)
			}
		})
	}
}
