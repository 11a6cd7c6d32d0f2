package data

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"testing"
	"testing/iotest"
	"time"
)

func h(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

const (
	getRandom = "80010000000c0000017b0020"            // TPM2_GetRandom(32)
	readClock = "80010000000a00000181"                // QEMU's probe
	prefixed  = "0000000803" + "0000000c" + getRandom // TPM_SEND_COMMAND, locality 3
)

func TestNotRunningResponse(t *testing.T) {
	if got, want := NotRunningResponse(), h("80010000000a00000101"); !bytes.Equal(got, want) {
		t.Fatalf("NotRunningResponse = %x, want %x", got, want)
	}
}

func TestFrame(t *testing.T) {
	tests := []struct {
		name     string
		in       string
		max      int
		wantCmd  string
		wantN    int
		wantNeed int
		prefixed bool
		loc      uint8
		sizeErr  bool
	}{
		{name: "empty", in: "", max: 4096, wantNeed: 6},
		{name: "partial header", in: "800100", max: 4096, wantNeed: 6},
		{name: "header only", in: "80010000000c0000", max: 4096, wantNeed: 12},
		{name: "complete", in: getRandom, max: 4096, wantCmd: getRandom, wantN: 12},
		{name: "two in one", in: readClock + getRandom, max: 4096, wantCmd: readClock, wantN: 10},
		{name: "prefixed", in: prefixed, max: 4096, wantCmd: getRandom, wantN: 21, prefixed: true, loc: 3},
		{name: "prefix partial", in: "00000008", max: 4096, wantNeed: 9},
		{name: "oversized", in: "800100001388", max: 4096, sizeErr: true},
		{name: "undersized", in: "800100000009", max: 4096, sizeErr: true},
		{name: "prefixed oversized", in: "0000000800" + "00001001", max: 4096, sizeErr: true, prefixed: true},
		{name: "TPM 1.2 tag framed by size", in: "00c10000000a00000099", max: 4096, wantCmd: "00c10000000a00000099", wantN: 10},
		{name: "at the limit", in: "8001" + "00000010" + "00000000000000000000", max: 16, wantCmd: "8001" + "00000010" + "00000000000000000000", wantN: 16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd, n, need, err := Frame(h(tt.in), tt.max)
			var se *SizeError
			if tt.sizeErr {
				if !errors.As(err, &se) {
					t.Fatalf("Frame err = %v, want *SizeError", err)
				}
				resp := se.Response()
				if tt.prefixed {
					resp = resp[4 : len(resp)-4]
				}
				if ResponseCode(resp) != RCCommandSize || be.Uint16(resp) != TagNoSessions {
					t.Fatalf("SizeError.Response = %x, want TPM_RC_COMMAND_SIZE with tag 8001", se.Response())
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n != tt.wantN || need != tt.wantNeed || !bytes.Equal(cmd.Bytes, h(tt.wantCmd)) ||
				cmd.Prefixed != tt.prefixed || cmd.Locality != tt.loc {
				t.Fatalf("Frame = %+v n %d need %d; want %s n %d need %d prefixed %v loc %d",
					cmd, n, need, tt.wantCmd, tt.wantN, tt.wantNeed, tt.prefixed, tt.loc)
			}
		})
	}
}

func TestReply(t *testing.T) {
	resp := h("80010000000a00000000")
	plain := Command{}
	if got := plain.Reply(resp); !bytes.Equal(got, resp) {
		t.Fatalf("plain Reply = %x", got)
	}
	pc := Command{Prefixed: true}
	if got, want := pc.Reply(resp), h("0000000a"+"80010000000a00000000"+"00000000"); !bytes.Equal(got, want) {
		t.Fatalf("prefixed Reply = %x, want %x", got, want)
	}
}

// The same stream yields the same commands however the reads split it.
func TestReaderSplits(t *testing.T) {
	stream := h(readClock + getRandom + prefixed + getRandom)
	want := []string{readClock, getRandom, getRandom, getRandom}
	readers := map[string]func() io.Reader{
		"whole":    func() io.Reader { return bytes.NewReader(stream) },
		"one byte": func() io.Reader { return iotest.OneByteReader(bytes.NewReader(stream)) },
		"half":     func() io.Reader { return iotest.HalfReader(bytes.NewReader(stream)) },
		"data+EOF": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(stream)) },
	}
	for name, mk := range readers {
		t.Run(name, func(t *testing.T) {
			r := NewReader(mk(), 4096, time.Second)
			for i, w := range want {
				cmd, err := r.Next()
				if err != nil {
					t.Fatalf("command %d: %v", i, err)
				}
				if !bytes.Equal(cmd.Bytes, h(w)) {
					t.Fatalf("command %d = %x, want %s", i, cmd.Bytes, w)
				}
			}
			if _, err := r.Next(); err != io.EOF {
				t.Fatalf("after the last command: %v, want io.EOF", err)
			}
		})
	}
}

func TestReaderErrors(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr func(error) bool
	}{
		{"truncated header", "800100", func(err error) bool { return errors.Is(err, ErrTruncated) }},
		{"truncated body", "80010000000c000001", func(err error) bool { return errors.Is(err, ErrTruncated) }},
		{"oversized", "8001ffffffff00000000", func(err error) bool { var se *SizeError; return errors.As(err, &se) }},
		{"empty", "", func(err error) bool { return err == io.EOF }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewReader(bytes.NewReader(h(tt.in)), 4096, time.Second).Next()
			if !tt.wantErr(err) {
				t.Fatalf("Next err = %v", err)
			}
		})
	}
}

// A peer that stalls inside a command does not hold the reader past its timeout, while
// a peer that is idle between commands may wait as long as it likes.
func TestReaderStallBounded(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	r := NewReader(server, 4096, 100*time.Millisecond)
	done := make(chan error, 1)
	go func() { _, err := r.Next(); done <- err }()
	if _, err := client.Write(h("8001000000")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("Next err = %v, want ErrTruncated", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Next still blocked 5 s after a stall; the bound is 100 ms")
	}
}

// A command's bytes (auth values, NV data) are wiped from the buffer once the next one
// is asked for.
func TestReaderWipesPreviousCommand(t *testing.T) {
	r := NewReader(bytes.NewReader(h(getRandom+readClock+getRandom)), 4096, time.Second)
	first, err := r.Next()
	if err != nil {
		t.Fatal(err)
	}
	kept := first.Bytes // aliases the reader's buffer
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(kept, make([]byte, len(kept))) {
		t.Fatalf("previous command still in the buffer: %x", kept)
	}
}
