package hookproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func frame(body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	return append(b, body...)
}

func TestRoundTrip(t *testing.T) {
	reqs := []Request{
		{Version: Version, Domain: "vm1", Op: OpPrepare, SubOp: "begin", Extra: "-", XML: "<domain><metadata><nkp:vm xmlns:nkp='" + Namespace + "'/></metadata></domain>"},
		{Version: Version, Domain: "ünïcode vm", Op: "some-future-op", SubOp: "-", Extra: "-"},
	}
	for _, r := range reqs {
		var buf bytes.Buffer
		if err := WriteRequest(&buf, r); err != nil {
			t.Fatal(err)
		}
		got, err := ReadRequest(&buf)
		if err != nil {
			t.Fatal(err)
		}
		if got != r {
			t.Errorf("got %+v, want %+v", got, r)
		}
	}
	for _, r := range []Reply{{Version: Version, Allow: true}, {Version: Version, Message: "vm \"a\": refused"}} {
		var buf bytes.Buffer
		if err := WriteReply(&buf, r); err != nil {
			t.Fatal(err)
		}
		got, err := ReadReply(&buf)
		if err != nil || got != r {
			t.Errorf("got %+v, %v, want %+v", got, err, r)
		}
	}
}

func TestReadRefuses(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "connection closed before a message"},
		{"short header", []byte{0, 0}, "reading length"},
		{"too large", binary.BigEndian.AppendUint32(nil, MaxRequest+1), "exceeds"},
		{"truncated", append(binary.BigEndian.AppendUint32(nil, 100), `{"version":1}`...), "truncated"},
		{"not json", frame("hello"), "invalid character"},
		{"unknown field", frame(`{"version":1,"domain":"a","op":"prepare","token":"x"}`), "unknown field"},
		{"trailing", frame(`{"version":1,"domain":"a","op":"prepare"} {}`), "trailing"},
		{"wrong version", frame(`{"version":2,"domain":"a","op":"prepare"}`), "same release"},
		{"null", frame(`null`), "request version 0"},
		{"no domain", frame(`{"version":1,"op":"prepare"}`), "without domain"},
		{"control char", frame(`{"version":1,"domain":"a\nb","op":"prepare"}`), "control characters"},
		{"long name", frame(`{"version":1,"domain":"` + strings.Repeat("a", MaxName+1) + `","op":"prepare"}`), "at most"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ReadRequest(bytes.NewReader(tt.in))
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v: want ErrProtocol mentioning %q", err, tt.want)
			}
		})
	}
}

func TestReplyRefuses(t *testing.T) {
	for _, body := range []string{`{"version":1,"allow":false}`, `{"version":1,"allow":false,"message":"  "}`, `{"version":7,"allow":true}`} {
		if _, err := ReadReply(bytes.NewReader(frame(body))); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: error %v, want ErrProtocol", body, err)
		}
	}
	if err := WriteReply(new(bytes.Buffer), Reply{Version: Version}); err == nil {
		t.Error("WriteReply sent a refusal without a message")
	}
}

func TestProtected(t *testing.T) {
	tests := []struct {
		xml  string
		want bool
	}{
		{"<domain type='qemu'><name>a</name></domain>", false},
		{"", false},
		{"<domain><metadata><nkp:vm xmlns:nkp=\"https://nkp.dev/ns/vm/1\"/></metadata></domain>", true},
		{"<domain><metadata><other xmlns='https://nkp.dev/ns/vm/2'/></metadata></domain>", false},
	}
	for _, tt := range tests {
		if got := Protected([]byte(tt.xml)); got != tt.want {
			t.Errorf("Protected(%q) = %v, want %v", tt.xml, got, tt.want)
		}
	}
}

func TestRequired(t *testing.T) {
	tests := map[string]bool{
		OpPrepare: true, OpStart: true, OpMigrate: true, OpRestore: true, "future": true,
		OpStarted: false, OpStopped: false, OpRelease: false, OpReconnect: false, OpAttach: false,
	}
	for op, want := range tests {
		if got := Required(op); got != want {
			t.Errorf("Required(%q) = %v, want %v", op, got, want)
		}
	}
}
