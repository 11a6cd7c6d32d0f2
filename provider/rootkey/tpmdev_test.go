package rootkey_test

import (
	"bytes"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/rootkey"
)

func TestParseTPMSpec(t *testing.T) {
	tests := []struct {
		spec, kind, path, wantErr string
	}{
		{"/dev/tpmrm0", "device", "/dev/tpmrm0", ""},
		{"swtpm:path=/run/swtpm/data.sock", "swtpm", "/run/swtpm/data.sock", ""},
		{"swtpm:/run/x", "", "", "swtpm:path=SOCKET"},
		{"swtpm:path=", "", "", "swtpm:path=SOCKET"},
		{"swtpm:path=/a,mode=0600", "", "", "swtpm:path=SOCKET"},
		{"tpmrm0", "", "", "/dev/tpmrm0"},
		{"", "", "", "/dev/tpmrm0"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			kind, path, err := rootkey.ParseTPMSpec(tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseTPMSpec(%q) = %q, %q, %v; want an error naming %q", tc.spec, kind, path, err, tc.wantErr)
				}
				return
			}
			if err != nil || kind != tc.kind || path != tc.path {
				t.Fatalf("ParseTPMSpec(%q) = %q, %q, %v; want %q, %q", tc.spec, kind, path, err, tc.kind, tc.path)
			}
		})
	}
}

func TestOpenTPMMissingSocket(t *testing.T) {
	_, err := rootkey.OpenTPM("swtpm:path=" + t.TempDir() + "/none.sock")
	if err == nil || !strings.Contains(err.Error(), "is swtpm running") {
		t.Fatalf("OpenTPM of a missing socket: %v, want an error asking whether swtpm runs", err)
	}
}

// TestSocketTPMFraming: responses are returned whole even when the TPM writes them in
// pieces, and a header with an impossible size is refused instead of misread.
func TestSocketTPMFraming(t *testing.T) {
	good := append([]byte{0x80, 0x01, 0, 0, 0, 16, 0, 0, 0, 0}, 1, 2, 3, 4, 5, 6)
	tests := []struct {
		name    string
		resp    []byte
		bufSize int
		wantErr string
	}{
		{"whole response in pieces", good, 4096, ""},
		{"size beyond 4096", []byte{0x80, 0x01, 0, 0, 0x10, 1, 0, 0, 0, 0}, 4096, "out of range"},
		{"size below the header", []byte{0x80, 0x01, 0, 0, 0, 4, 0, 0, 0, 0}, 4096, "out of range"},
		{"buffer too small", good, 12, "buffer"},
		{"connection closed mid-response", good[:12], 4096, "16-byte response"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "tpm.sock")
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			served := make(chan error, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					served <- err
					return
				}
				defer c.Close()
				cmd := make([]byte, 10)
				if _, err := io.ReadFull(c, cmd); err != nil {
					served <- err
					return
				}
				for i := 0; i < len(tc.resp); i += 3 { // in 3-byte pieces
					if _, err := c.Write(tc.resp[i:min(i+3, len(tc.resp))]); err != nil {
						served <- err
						return
					}
				}
				served <- nil
			}()
			rw, err := rootkey.OpenTPM("swtpm:path=" + sock)
			if err != nil {
				t.Fatal(err)
			}
			defer rw.Close()
			if _, err := rw.Write([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7b}); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, tc.bufSize)
			n, err := rw.Read(buf)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Read = %d, %v; want an error naming %q", n, err, tc.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(buf[:n], tc.resp) {
				t.Fatalf("Read = %x, %v; want %x", buf[:n], err, tc.resp)
			}
			if err := <-served; err != nil {
				t.Fatalf("fake TPM: %v", err)
			}
		})
	}
}
