package rootkey

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
)

// TPMSpecHelp describes the forms OpenTPM accepts, for flag help and error messages.
const TPMSpecHelp = "a TPM device (/dev/tpmrm0) or swtpm:path=SOCKET (a swtpm or nkp-swtpm data socket)"

// tpmCommandTimeout bounds one command on a socket TPM.
const tpmCommandTimeout = 60 * time.Second

// maxTPMResponse bounds a response read from a socket TPM (TPM 2.0 responses fit in 4 KiB;
// go-tpm reads into a buffer of that size).
const maxTPMResponse = 4096

// ParseTPMSpec splits a TPM spec into the transport ("device" or "swtpm") and its path.
func ParseTPMSpec(spec string) (kind, path string, err error) {
	if rest, ok := strings.CutPrefix(spec, "swtpm:"); ok {
		path, ok = strings.CutPrefix(rest, "path=")
		if !ok || path == "" || strings.Contains(path, ",") {
			return "", "", fmt.Errorf("TPM %q: want swtpm:path=SOCKET (the data socket of `swtpm socket --server type=unixio,path=SOCKET`)", spec)
		}
		return "swtpm", path, nil
	}
	if !strings.HasPrefix(spec, "/") {
		return "", "", fmt.Errorf("TPM %q: want %s", spec, TPMSpecHelp)
	}
	return "device", spec, nil
}

// OpenTPM opens the provider host's TPM named by spec: a TPM character device (the
// kernel's resource manager /dev/tpmrm0 on real hosts), or swtpm:path=SOCKET, the data
// socket of a swtpm (or nkp-swtpm) that is already initialised (started with
// `--flags not-need-init,startup-clear`, or CMD_INIT sent on its control channel). The
// caller closes it; the root key needs the TPM only while it is created or loaded.
func OpenTPM(spec string) (io.ReadWriteCloser, error) {
	kind, path, err := ParseTPMSpec(spec)
	if err != nil {
		return nil, err
	}
	if kind == "device" {
		rw, err := tpm2.OpenTPM(path)
		if err != nil {
			return nil, fmt.Errorf("TPM device %s: %w (is it a TPM 2.0 device, and may this user open it?)", path, err)
		}
		return rw, nil
	}
	c, err := net.DialTimeout("unix", path, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("swtpm data socket %s: %w (is swtpm running with --server type=unixio,path=%s?)", path, err, path)
	}
	return &socketTPM{conn: c, path: path}, nil
}

// socketTPM carries TPM commands over a stream socket: it writes each command whole and
// reads back exactly one response (header, then the size the header gives), so a response
// split across reads reaches go-tpm in one piece.
type socketTPM struct {
	conn net.Conn
	path string
}

func (s *socketTPM) Write(p []byte) (int, error) {
	if err := s.conn.SetDeadline(time.Now().Add(tpmCommandTimeout)); err != nil {
		return 0, fmt.Errorf("swtpm %s: %w", s.path, err)
	}
	n, err := s.conn.Write(p)
	if err != nil {
		return n, fmt.Errorf("swtpm %s: sending a command: %w", s.path, err)
	}
	return n, nil
}

func (s *socketTPM) Read(p []byte) (int, error) {
	var hdr [10]byte
	if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
		return 0, fmt.Errorf("swtpm %s: reading a response header: %w (was the TPM initialised, e.g. --flags not-need-init,startup-clear?)", s.path, err)
	}
	size := int(binary.BigEndian.Uint32(hdr[2:6]))
	if size < len(hdr) || size > maxTPMResponse {
		return 0, fmt.Errorf("swtpm %s: response size %d out of range [10, %d]", s.path, size, maxTPMResponse)
	}
	if len(p) < size {
		return 0, fmt.Errorf("swtpm %s: response of %d bytes for a %d-byte buffer: %w", s.path, size, len(p), io.ErrShortBuffer)
	}
	copy(p, hdr[:])
	if _, err := io.ReadFull(s.conn, p[len(hdr):size]); err != nil {
		return 0, fmt.Errorf("swtpm %s: reading a %d-byte response: %w", s.path, size, err)
	}
	return size, nil
}

func (s *socketTPM) Close() error {
	if err := s.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("swtpm %s: %w", s.path, err)
	}
	return nil
}
