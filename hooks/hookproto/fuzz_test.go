package hookproto

import (
	"bytes"
	"testing"
)

// FuzzReadRequest: any bytes from the socket either fail with ErrProtocol or give a
// request that validates and survives a round trip unchanged.
func FuzzReadRequest(f *testing.F) {
	f.Add(frame(`{"version":1,"domain":"vm","op":"prepare","sub_op":"begin","extra":"-","xml":"<domain/>"}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := ReadRequest(bytes.NewReader(in))
		if err != nil {
			return
		}
		var buf bytes.Buffer
		if err := WriteRequest(&buf, r); err != nil {
			t.Fatalf("accepted request %+v does not re-encode: %v", r, err)
		}
		back, err := ReadRequest(&buf)
		if err != nil || back != r {
			t.Fatalf("round trip: %+v, %v; want %+v", back, err, r)
		}
	})
}

// FuzzReadReply: the same for replies, and a refusal always carries a sentence.
func FuzzReadReply(f *testing.F) {
	f.Add(frame(`{"version":1,"allow":true}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := ReadReply(bytes.NewReader(in))
		if err != nil {
			return
		}
		if !r.Allow && r.Message == "" {
			t.Fatal("refusal without a message accepted")
		}
		var buf bytes.Buffer
		if err := WriteReply(&buf, r); err != nil {
			t.Fatal(err)
		}
		back, err := ReadReply(&buf)
		if err != nil || back != r {
			t.Fatalf("round trip: %+v, %v; want %+v", back, err, r)
		}
	})
}
