package audit_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

// An action and its audit record commit in one transaction; Verify then names a record
// that was changed behind the log's back.
func Example() {
	ctx := context.Background()
	s := mem.New()
	for _, host := range []string{"host-a", "host-b"} {
		err := s.Update(ctx, func(tx store.Tx) error {
			if err := tx.Put("hosts", host, []byte(`{"revoked":true}`)); err != nil {
				return err
			}
			_, err := audit.Append(tx, audit.Event{
				Time:    time.Date(2026, 11, 28, 9, 0, 0, 0, time.UTC),
				Kind:    audit.KindRevoke,
				Actor:   "admin:ops",
				Subject: host,
			})
			return err
		})
		if err != nil {
			fmt.Println(err)
		}
	}
	_ = s.View(ctx, func(tx store.Tx) error {
		recs, _ := audit.List(tx, 0, 0)
		for _, r := range recs {
			fmt.Println(r.Seq, r.Kind, r.Subject)
		}
		fmt.Println("verify:", audit.Verify(tx))
		return nil
	})

	// Someone edits record 1 in the store directly.
	_ = s.Update(ctx, func(tx store.Tx) error {
		v, _ := tx.Get(audit.Bucket, "00000000000000000001")
		r, _ := audit.Decode(v)
		r.Subject = "host-z"
		return tx.Put(audit.Bucket, "00000000000000000001", mustJSON(r))
	})
	_ = s.View(ctx, func(tx store.Tx) error {
		err := audit.Verify(tx)
		fmt.Println("tampered:", errors.Is(err, audit.ErrTampered))
		fmt.Println(err)
		return nil
	})
	// Output:
	// 1 revoke host-a
	// 2 revoke host-b
	// verify: <nil>
	// tampered: true
	// audit log: record 1: changed: its content does not match its hash
}

func mustJSON(r audit.Record) []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	return b
}
