package audit_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

var t0 = time.Date(2026, 11, 28, 8, 0, 0, 123456789, time.UTC)

// logOf returns a store holding n records.
func logOf(t *testing.T, n int) *mem.Store {
	t.Helper()
	s := mem.New()
	kinds := []audit.Kind{audit.KindInit, audit.KindBackup, audit.KindToken, audit.KindEnroll, audit.KindRelease}
	for i := 0; i < n; i++ {
		err := s.Update(context.Background(), func(tx store.Tx) error {
			_, err := audit.Append(tx, audit.Event{
				Time:    t0.Add(time.Duration(i) * time.Second),
				Kind:    kinds[i%len(kinds)],
				Actor:   "admin:ops",
				Subject: fmt.Sprintf("host-%d", i),
				Details: map[string]string{"kdk_id": "c0ffee", "version": "1"},
			})
			return err
		})
		if err != nil {
			t.Fatalf("append %d: %v", i+1, err)
		}
	}
	return s
}

func verify(s store.Store) error {
	return s.View(context.Background(), func(tx store.Tx) error { return audit.Verify(tx) })
}

func raw(t *testing.T, s store.Store, seq int) []byte {
	t.Helper()
	var v []byte
	err := s.View(context.Background(), func(tx store.Tx) (err error) {
		v, err = tx.Get(audit.Bucket, fmt.Sprintf("%020d", seq))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestAppendAndList(t *testing.T) {
	s := logOf(t, 5)
	if err := verify(s); err != nil {
		t.Fatalf("untouched log: %v", err)
	}
	cases := []struct {
		name        string
		after       uint64
		limit, tail int
		want        []uint64
	}{
		{"all", 0, 0, 0, []uint64{1, 2, 3, 4, 5}},
		{"after 3", 3, 0, 0, []uint64{4, 5}},
		{"limit 2", 1, 2, 0, []uint64{2, 3}},
		{"past end", 5, 10, 0, nil},
		{"tail 2", 0, 0, 2, []uint64{4, 5}},
		{"tail 9", 0, 0, 9, []uint64{1, 2, 3, 4, 5}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var recs []audit.Record
			err := s.View(context.Background(), func(tx store.Tx) (err error) {
				if c.tail > 0 {
					recs, err = audit.Tail(tx, c.tail)
				} else {
					recs, err = audit.List(tx, c.after, c.limit)
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			var got []uint64
			for _, r := range recs {
				got = append(got, r.Seq)
			}
			if fmt.Sprint(got) != fmt.Sprint(c.want) {
				t.Fatalf("seqs = %v, want %v", got, c.want)
			}
		})
	}
	var r audit.Record
	_ = s.View(context.Background(), func(tx store.Tx) error {
		recs, err := audit.List(tx, 1, 1)
		if err == nil {
			r = recs[0]
		}
		return err
	})
	if !r.Time.Equal(t0.Add(time.Second)) || r.Kind != audit.KindBackup || r.Subject != "host-1" || r.Details["kdk_id"] != "c0ffee" || r.Prev == "" || len(r.Hash) != 64 {
		t.Fatalf("record 2 read back as %+v", r)
	}
}

func TestVerifyDetectsTampering(t *testing.T) {
	type edit func(t *testing.T, tx store.Tx)
	key := func(seq int) string { return fmt.Sprintf("%020d", seq) }
	rewrite := func(seq int, change func(*audit.Record)) edit {
		return func(t *testing.T, tx store.Tx) {
			v, err := tx.Get(audit.Bucket, key(seq))
			if err != nil {
				t.Fatal(err)
			}
			var r audit.Record
			if err := json.Unmarshal(v, &r); err != nil {
				t.Fatal(err)
			}
			change(&r)
			v, _ = json.Marshal(r)
			if err := tx.Put(audit.Bucket, key(seq), v); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name    string
		edit    edit
		wantSeq uint64
	}{
		{"changed subject", rewrite(3, func(r *audit.Record) { r.Subject = "host-evil" }), 3},
		{"changed detail", rewrite(2, func(r *audit.Record) { r.Details["version"] = "2" }), 2},
		{"changed time", rewrite(4, func(r *audit.Record) { r.Time = r.Time.Add(-time.Hour) }), 4},
		{"changed kind", rewrite(1, func(r *audit.Record) { r.Kind = audit.KindRotate }), 1},
		{"removed middle", func(t *testing.T, tx store.Tx) { _ = tx.Delete(audit.Bucket, key(3)) }, 3},
		{"removed first", func(t *testing.T, tx store.Tx) { _ = tx.Delete(audit.Bucket, key(1)) }, 1},
		{"removed last", func(t *testing.T, tx store.Tx) { _ = tx.Delete(audit.Bucket, key(5)) }, 5},
		{"swapped 2 and 3", func(t *testing.T, tx store.Tx) {
			a, _ := tx.Get(audit.Bucket, key(2))
			b, _ := tx.Get(audit.Bucket, key(3))
			_ = tx.Put(audit.Bucket, key(2), b)
			_ = tx.Put(audit.Bucket, key(3), a)
		}, 2},
		{"renumbered to hide a removal", func(t *testing.T, tx store.Tx) {
			v, _ := tx.Get(audit.Bucket, key(4))
			_ = tx.Delete(audit.Bucket, key(4))
			_ = tx.Put(audit.Bucket, key(3), v)
		}, 3},
		{"changed and rehashed", rewrite(2, func(r *audit.Record) { r.Actor = "nobody"; r.Hash = strings.Repeat("0", 64) }), 2},
		{"garbage", func(t *testing.T, tx store.Tx) { _ = tx.Put(audit.Bucket, key(2), []byte("{not json")) }, 2},
		{"stray key", func(t *testing.T, tx store.Tx) { _ = tx.Put(audit.Bucket, "zzz", []byte("{}")) }, 6},
		{"appended without head", func(t *testing.T, tx store.Tx) {
			v, _ := tx.Get(audit.Bucket, key(5))
			_ = tx.Put(audit.Bucket, key(6), v)
		}, 6},
		{"head moved back", func(t *testing.T, tx store.Tx) {
			_ = tx.Put(audit.HeadBucket, "head", []byte(`{"seq":4,"hash":"00"}`))
		}, 5},
		{"head hash changed", func(t *testing.T, tx store.Tx) {
			_ = tx.Put(audit.HeadBucket, "head", []byte(`{"seq":5,"hash":"00"}`))
		}, 5},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := logOf(t, 5)
			if err := s.Update(context.Background(), func(tx store.Tx) error { c.edit(t, tx); return nil }); err != nil {
				t.Fatal(err)
			}
			err := verify(s)
			var ve *audit.VerifyError
			if !errors.As(err, &ve) || !errors.Is(err, audit.ErrTampered) {
				t.Fatalf("Verify = %v, want a *VerifyError wrapping ErrTampered", err)
			}
			if ve.Seq != c.wantSeq {
				t.Fatalf("Verify named record %d (%v), want %d", ve.Seq, err, c.wantSeq)
			}
		})
	}
}

func TestAppendRefuses(t *testing.T) {
	cases := []struct {
		name string
		ev   audit.Event
	}{
		{"no kind", audit.Event{Subject: "x"}},
		{"kdk detail", audit.Event{Kind: audit.KindRelease, Details: map[string]string{"kdk": "00"}}},
		{"passphrase detail", audit.Event{Kind: audit.KindBackup, Details: map[string]string{"Passphrase": "hunter2"}}},
		{"token secret", audit.Event{Kind: audit.KindToken, Details: map[string]string{"token_secret": "s"}}},
		{"long subject", audit.Event{Kind: audit.KindRevoke, Subject: strings.Repeat("h", audit.MaxFieldLen+1)}},
		{"long value", audit.Event{Kind: audit.KindRevoke, Details: map[string]string{"why": strings.Repeat("v", audit.MaxDetailValue+1)}}},
		{"empty detail name", audit.Event{Kind: audit.KindRevoke, Details: map[string]string{"": "v"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := mem.New()
			err := s.Update(context.Background(), func(tx store.Tx) error {
				_, err := audit.Append(tx, c.ev)
				return err
			})
			if !errors.Is(err, audit.ErrInvalidEvent) {
				t.Fatalf("Append = %v, want ErrInvalidEvent", err)
			}
			_ = s.View(context.Background(), func(tx store.Tx) error {
				seq, _, err := audit.Head(tx)
				if err != nil || seq != 0 {
					t.Fatalf("a refused event left head %d, %v", seq, err)
				}
				return nil
			})
		})
	}
}

// An action that fails after appending leaves no record: the record commits with it.
func TestAppendRollsBackWithTheAction(t *testing.T) {
	s := logOf(t, 2)
	boom := errors.New("action failed")
	err := s.Update(context.Background(), func(tx store.Tx) error {
		if _, err := audit.Append(tx, audit.Event{Kind: audit.KindRevoke, Subject: "h"}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatal(err)
	}
	_ = s.View(context.Background(), func(tx store.Tx) error {
		if seq, _, _ := audit.Head(tx); seq != 2 {
			t.Fatalf("head = %d after a failed action, want 2", seq)
		}
		return nil
	})
	if err := verify(s); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentAppends(t *testing.T) {
	backends := []struct {
		name string
		open func(t *testing.T) store.Store
	}{
		{"mem", func(*testing.T) store.Store { return mem.New() }},
		{"bolt (group commit)", func(t *testing.T) store.Store {
			s, err := boltstore.Open(filepath.Join(t.TempDir(), "provider.db"), boltstore.Options{})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}},
	}
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			s := b.open(t)
			defer s.Close()
			var wg sync.WaitGroup
			for i := 0; i < 8; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for j := 0; j < 10; j++ {
						err := s.Update(context.Background(), func(tx store.Tx) error {
							_, err := audit.Append(tx, audit.Event{Kind: audit.KindRelease, Subject: "h"})
							return err
						})
						if err != nil {
							t.Error(err)
						}
					}
				}()
			}
			wg.Wait()
			if err := verify(s); err != nil {
				t.Fatal(err)
			}
			_ = s.View(context.Background(), func(tx store.Tx) error {
				if seq, _, _ := audit.Head(tx); seq != 80 {
					t.Fatalf("head = %d, want 80", seq)
				}
				return nil
			})
		})
	}
}

func TestLog(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	s := logOf(t, 1)
	var recs []audit.Record
	_ = s.View(context.Background(), func(tx store.Tx) (err error) { recs, err = audit.List(tx, 0, 0); return err })
	audit.Log(context.Background(), log, recs[0])
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("log line %q: %v", buf.String(), err)
	}
	d, _ := line["details"].(map[string]any)
	if line["msg"] != "audit" || line["kind"] != "init" || line["seq"] != float64(1) || line["subject"] != "host-0" || d["kdk_id"] != "c0ffee" {
		t.Fatalf("log line = %s", buf.String())
	}
}

func TestRecordJSONStable(t *testing.T) {
	v := raw(t, logOf(t, 1), 1)
	r, err := audit.Decode(v)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := json.Marshal(r)
	if !bytes.Equal(again, v) {
		t.Fatalf("record does not round-trip:\n%s\n%s", v, again)
	}
}

// spyTx records the keys a transaction reads.
type spyTx struct {
	store.Tx
	reads []store.Read
}

func (s *spyTx) Get(bucket, key string) ([]byte, error) {
	s.reads = append(s.reads, store.Key(bucket, key))
	return s.Tx.Get(bucket, key)
}

func (s *spyTx) List(bucket, prefix string, fn func(string, []byte) error) error {
	s.reads = append(s.reads, store.Range(bucket, prefix))
	return s.Tx.List(bucket, prefix, fn)
}

// AppendReads names every key Append reads, on an empty log and on a longer one, so a
// transaction that prefetches it reads nothing else for the audit record.
func TestAppendReads(t *testing.T) {
	s := mem.New()
	for i := range 3 {
		var spy *spyTx
		err := s.Update(context.Background(), func(tx store.Tx) error {
			spy = &spyTx{Tx: tx}
			_, err := audit.Append(spy, audit.Event{Kind: audit.KindRelease, Actor: "host:h", Subject: "h"})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if got, want := fmt.Sprint(spy.reads), fmt.Sprint(audit.AppendReads()); got != want {
			t.Fatalf("append %d read %s, AppendReads names %s", i, got, want)
		}
	}
}
