package hookproto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// TestFramings: requests and replies survive both framings; a reader of either framing
// tells them apart by the first byte and answers in the request's framing.
func TestFramings(t *testing.T) {
	reqs := []Request{
		{Domain: "vm1", Op: OpPrepare, SubOp: "begin", Extra: "-", XML: "<domain><metadata><nkp:vm xmlns:nkp='" + Namespace + "'/></metadata></domain>"},
		{Domain: "ünïcode vm", Op: "some-future-op", SubOp: "-", Extra: "-"},
	}
	for _, r := range reqs {
		for _, v := range []int{Version, Version2} {
			var buf bytes.Buffer
			var err error
			if v == Version2 {
				err = WriteRequest2(&buf, r)
			} else {
				r1 := r
				r1.Version = Version
				err = WriteRequest(&buf, r1)
			}
			if err != nil {
				t.Fatal(err)
			}
			got, framing, err := ReadRequestAny(bufio.NewReader(&buf))
			want := r
			want.Version = v
			if err != nil || framing != v || got != want {
				t.Errorf("framing %d: got %+v, %d, %v; want %+v", v, got, framing, err, want)
			}
		}
	}
	for _, r := range []Reply{{Allow: true}, {Allow: true, Message: "nkp: warning"}, {Message: "vm \"a\": refused"}} {
		for _, v := range []int{Version, Version2} {
			var buf bytes.Buffer
			if err := WriteReplyIn(&buf, v, r); err != nil {
				t.Fatal(err)
			}
			got, err := ReadReplyAny(&buf)
			want := r
			want.Version = v
			if err != nil || got != want {
				t.Errorf("framing %d: got %+v, %v; want %+v", v, got, err, want)
			}
		}
	}
	b, err := AppendReply2(nil, Reply{Allow: true})
	if err != nil || string(b) != ReplyAllow {
		t.Errorf("allow without a message encodes as %q, %v; ReplyAllow is %q", b, err, ReplyAllow)
	}
}

// TestFraming2Errors: malformed binary messages are refused with ErrProtocol and a
// sentence naming what is wrong.
func TestFraming2Errors(t *testing.T) {
	good, err := AppendRequest2(nil, Request{Domain: "vm1", Op: OpPrepare, SubOp: "begin", Extra: "-", XML: "<domain/>"})
	if err != nil {
		t.Fatal(err)
	}
	name := func(n int) string { return string(binary.LittleEndian.AppendUint32(nil, uint32(n))) }
	tests := []struct {
		name, in, want string
		reply          bool
	}{
		{name: "empty", in: "", want: "closed before a message"},
		{name: "other magic", in: "nkpx\x02", want: "not \"nkph\""},
		{name: "version 3", in: Magic + "\x03", want: "version 3"},
		{name: "truncated", in: string(good[:len(good)-1]), want: "truncated"},
		{name: "trailing", in: string(good) + "x", want: "after the message"},
		{name: "long domain", in: Magic + "\x02" + name(MaxName+1), want: "domain: hook protocol: 1025 bytes exceed 1024"},
		{name: "huge XML", in: Magic + "\x02" + name(1) + "v" + name(1) + "p" + name(0) + name(0) + name(MaxRequest), want: "XML"},
		{name: "no operation", in: Magic + "\x02" + name(1) + "v" + name(0) + name(0) + name(0) + name(0), want: "without domain or operation"},
		{name: "control character", in: Magic + "\x02" + name(1) + "\n" + name(1) + "p" + name(0) + name(0) + name(0), want: "control characters"},
		{name: "XML not UTF-8", in: Magic + "\x02" + name(1) + "v" + name(1) + "p" + name(0) + name(0) + name(1) + "\xff", want: "not valid UTF-8"},
		{name: "reply: allow byte 2", reply: true, in: Magic + "\x02\x02" + name(0), want: "allow byte 2"},
		{name: "reply: refusal without a message", reply: true, in: Magic + "\x02\x00" + name(0), want: "refusal without a message"},
		{name: "reply: message too long", reply: true, in: Magic + "\x02\x00" + name(MaxReply+1), want: "exceed"},
		{name: "reply: truncated", reply: true, in: ReplyAllow[:7], want: "truncated"},
		{name: "reply: trailing", reply: true, in: ReplyAllow + "x", want: "after the message"},
	}
	for _, tt := range tests {
		var err error
		if tt.reply {
			_, err = DecodeReply2([]byte(tt.in))
		} else {
			_, err = DecodeRequest2([]byte(tt.in))
		}
		if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want ErrProtocol and %q", tt.name, err, tt.want)
		}
	}
}

// FuzzDecodeRequest2: any bytes either fail with ErrProtocol or give a request that
// validates and encodes back to the same bytes.
func FuzzDecodeRequest2(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := DecodeRequest2(in)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error without ErrProtocol: %v", err)
			}
			return
		}
		if r.Version != Version2 {
			t.Fatalf("version %d", r.Version)
		}
		back, err := AppendRequest2(nil, r)
		if err != nil || !bytes.Equal(back, in) {
			t.Fatalf("accepted %q re-encodes as %q, %v", in, back, err)
		}
		r2, framing, err := ReadRequestAny(bufio.NewReader(bytes.NewReader(in)))
		if err != nil || framing != Version2 || r2 != r {
			t.Fatalf("ReadRequestAny: %+v, %d, %v; DecodeRequest2: %+v", r2, framing, err, r)
		}
	})
}

// FuzzDecodeReply2: the same for replies; a refusal always carries a sentence, and only
// ReplyAllow is an allow without a message.
func FuzzDecodeReply2(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := DecodeReply2(in)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error without ErrProtocol: %v", err)
			}
			return
		}
		if !r.Allow && r.Message == "" {
			t.Fatal("refusal without a message accepted")
		}
		if (r.Allow && r.Message == "") != (string(in) == ReplyAllow) {
			t.Fatalf("%q decodes as %+v", in, r)
		}
		back, err := AppendReply2(nil, r)
		if err != nil || !bytes.Equal(back, in) {
			t.Fatalf("accepted %q re-encodes as %q, %v", in, back, err)
		}
		r2, err := ReadReplyAny(bytes.NewReader(in))
		if err != nil || r2 != r {
			t.Fatalf("ReadReplyAny: %+v, %v; DecodeReply2: %+v", r2, err, r)
		}
	})
}
