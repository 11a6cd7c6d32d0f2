package audit_test

import (
	"context"
	"testing"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

// FuzzVerify feeds arbitrary bytes as stored record 1 and head (a store is untrusted
// input: a tampered file, a hostile etcd member). Verify must not panic, and it may accept
// only a record that decodes, is number 1 and matches its hash and the head.
func FuzzVerify(f *testing.F) {
	f.Add([]byte(`{"seq":1,"time":"2026-11-28T08:00:00Z","kind":"init","prev":"","hash":"00"}`), []byte(`{"seq":1,"hash":"00"}`))
	f.Add([]byte(`{`), []byte(`{"seq":1}`))
	f.Add([]byte(`null`), []byte(`null`))
	f.Fuzz(func(t *testing.T, record, head []byte) {
		s := mem.New()
		err := s.Update(context.Background(), func(tx store.Tx) error {
			if err := tx.Put(audit.Bucket, "00000000000000000001", record); err != nil {
				return err
			}
			return tx.Put(audit.HeadBucket, "head", head)
		})
		if err != nil {
			t.Fatal(err)
		}
		err = s.View(context.Background(), func(tx store.Tx) error { return audit.Verify(tx) })
		if err != nil {
			return
		}
		r, derr := audit.Decode(record)
		if derr != nil || r.Seq != 1 || r.Prev != "" {
			t.Fatalf("Verify accepted %q (decoded %+v, %v)", record, r, derr)
		}
		// An accepted record must still verify after appending to it.
		err = s.Update(context.Background(), func(tx store.Tx) error {
			_, err := audit.Append(tx, audit.Event{Kind: audit.KindRotate})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.View(context.Background(), func(tx store.Tx) error { return audit.Verify(tx) }); err != nil {
			t.Fatalf("append after an accepted record: %v", err)
		}
	})
}
