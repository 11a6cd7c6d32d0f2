package tpmdev

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
)

// TestSendFraming: responses are returned whole even when the TPM writes them in
// pieces, and a header with an impossible size is refused instead of misread.
func TestSendFraming(t *testing.T) {
	good := append([]byte{0x80, 0x01, 0, 0, 0, 16, 0, 0, 0, 0}, 1, 2, 3, 4, 5, 6)
	tests := []struct {
		name    string
		resp    []byte
		wantErr string
	}{
		{"whole response in pieces", good, ""},
		{"size beyond 4096", []byte{0x80, 0x01, 0, 0, 0x10, 1, 0, 0, 0, 0}, "out of range"},
		{"size below the header", []byte{0x80, 0x01, 0, 0, 0, 4, 0, 0, 0, 0}, "out of range"},
		{"connection closed mid-response", good[:12], "16-byte response"},
		{"connection closed mid-header", good[:6], "response header"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			served := make(chan error, 1)
			go func() {
				defer server.Close()
				cmd := make([]byte, 10)
				if _, err := io.ReadFull(server, cmd); err != nil {
					served <- err
					return
				}
				for i := 0; i < len(tc.resp); i += 3 { // in 3-byte pieces
					if _, err := server.Write(tc.resp[i:min(i+3, len(tc.resp))]); err != nil {
						served <- err
						return
					}
				}
				served <- nil
			}()
			s := &socketTPM{conn: client, path: "pipe"}
			defer s.Close()
			rsp, err := s.Send([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7b})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "swtpm pipe") {
					t.Fatalf("Send = %x, %v; want an error naming the socket and %q", rsp, err, tc.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(rsp, tc.resp) {
				t.Fatalf("Send = %x, %v; want %x", rsp, err, tc.resp)
			}
			if err := <-served; err != nil {
				t.Fatalf("fake TPM: %v", err)
			}
		})
	}
}

// fixedTPM answers every command with rsp, or fails with err.
type fixedTPM struct {
	rsp []byte
	err error
}

func (f fixedTPM) Send([]byte) ([]byte, error) { return bytes.Clone(f.rsp), f.err }

// TestReadWriter: one Write, one Read of the whole response with a nil error (what
// go-tpm's tpmutil.RunCommandRaw needs), then io.EOF; a short buffer is an error, not
// a cut response; a failed Send fails the Write.
func TestReadWriter(t *testing.T) {
	rsp := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0xaa, 0xbb}
	sendErr := errors.New("device gone")
	tests := []struct {
		name     string
		tpm      fixedTPM
		buf      int
		wantWErr error
		wantN    int
		wantRErr error
	}{
		{"whole response, nil error", fixedTPM{rsp: rsp}, 4096, nil, len(rsp), nil},
		{"exact buffer", fixedTPM{rsp: rsp}, len(rsp), nil, len(rsp), nil},
		{"short buffer", fixedTPM{rsp: rsp}, 11, nil, 0, io.ErrShortBuffer},
		{"send fails", fixedTPM{err: sendErr}, 4096, sendErr, 0, io.EOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rw := ReadWriter(tc.tpm)
			if _, err := rw.Write([]byte{1, 2, 3}); !errors.Is(err, tc.wantWErr) {
				t.Fatalf("Write: %v, want %v", err, tc.wantWErr)
			}
			buf := make([]byte, tc.buf)
			n, err := rw.Read(buf)
			if n != tc.wantN || !errors.Is(err, tc.wantRErr) {
				t.Fatalf("Read = %d, %v; want %d, %v", n, err, tc.wantN, tc.wantRErr)
			}
			if err == nil && !bytes.Equal(buf[:n], rsp) {
				t.Fatalf("Read %x, want %x", buf[:n], rsp)
			}
			if n, err := rw.Read(buf); n != 0 || err != io.EOF {
				t.Fatalf("second Read = %d, %v; want 0, io.EOF", n, err)
			}
		})
	}
}
