// Package tpmdev opens a host's TPM 2.0: the kernel's resource manager /dev/tpmrm0 on
// real hosts, or a socket TPM — the data socket of a swtpm or nkp-swtpm, optionally with
// its control socket so that Open can power the TPM on — for tests and for hosts without
// a TPM chip. It is the one place that does so, for the provider's sealed root key
// (provider/rootkey) and for hostd's TPM-bound KDK cache.
//
// An open TPM has go-tpm's one-method transport shape (transport.TPMCloser: Send one
// command, get one response). Code that calls go-tpm-tools' client or go-tpm's legacy
// tpm2 package, which take an io.ReadWriter, wraps it with ReadWriter; go-tpm's own
// transport.ToReadWriter returns io.EOF together with the response's last bytes, which
// those packages take for a failure. Tests use the go-tpm-tools simulator through
// transport.FromReadWriteCloser, or a real swtpm through Open.
//
// Who may import it: provider/rootkey, hostd, commands and tests. It links no cgo.
package tpmdev

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
)

// DefaultDevice is the TPM that Open("") opens: the kernel's resource manager, which
// lets several processes share the TPM and flushes what each leaves loaded.
const DefaultDevice = "/dev/tpmrm0"

// SpecHelp describes the forms Open accepts, for flag help and error messages.
const SpecHelp = "a TPM device (" + DefaultDevice + ") or swtpm:path=DATA_SOCKET[,ctrl=CTRL_SOCKET] (a swtpm or nkp-swtpm; with ctrl= it is powered on if needed)"

// Kinds of Spec.
const (
	KindDevice = "device"
	KindSwtpm  = "swtpm"
)

// CommandTimeout bounds one command on a socket TPM (an RSA key generation on a slow
// host takes seconds; a TPM that does not answer in a minute is gone).
const CommandTimeout = 60 * time.Second

// MaxResponse bounds a TPM response: the kernel's and swtpm's buffer size, and the
// buffer go-tpm reads into.
const MaxResponse = 4096

// dialTimeout bounds connecting to a socket TPM.
const dialTimeout = 10 * time.Second

// Spec is a parsed TPM name.
type Spec struct {
	Kind string // KindDevice or KindSwtpm
	Path string // the device, or the swtpm data socket
	Ctrl string // the swtpm control socket; "" when not given
}

// ParseSpec reads a TPM name: "" (DefaultDevice), an absolute device path, or
// swtpm:path=DATA_SOCKET[,ctrl=CTRL_SOCKET].
func ParseSpec(s string) (Spec, error) {
	if s == "" {
		return Spec{Kind: KindDevice, Path: DefaultDevice}, nil
	}
	if rest, ok := strings.CutPrefix(s, "swtpm:"); ok {
		sp := Spec{Kind: KindSwtpm}
		for _, item := range strings.Split(rest, ",") {
			name, val, _ := strings.Cut(item, "=")
			switch {
			case name == "path" && sp.Path == "" && val != "":
				sp.Path = val
			case name == "ctrl" && sp.Ctrl == "" && val != "":
				sp.Ctrl = val
			default:
				return Spec{}, fmt.Errorf("TPM %q: %q is not understood; want swtpm:path=DATA_SOCKET[,ctrl=CTRL_SOCKET] (the sockets of `swtpm socket --server type=unixio,path=DATA_SOCKET --ctrl type=unixio,path=CTRL_SOCKET`)", s, item)
			}
		}
		if sp.Path == "" {
			return Spec{}, fmt.Errorf("TPM %q: no path=; want swtpm:path=DATA_SOCKET[,ctrl=CTRL_SOCKET]", s)
		}
		return sp, nil
	}
	if !strings.HasPrefix(s, "/") {
		return Spec{}, fmt.Errorf("TPM %q: want %s", s, SpecHelp)
	}
	return Spec{Kind: KindDevice, Path: s}, nil
}

// Open opens the TPM named by spec (see ParseSpec and SpecHelp). A device is opened as
// it is; the kernel has started it. A socket TPM gets TPM2_Startup(CLEAR) unless it has
// been started already; one that is not powered on (no CMD_INIT yet) is powered on
// through its control socket when the spec names one, and refused otherwise. The caller
// closes the TPM; Send is safe for concurrent use.
func Open(spec string) (transport.TPMCloser, error) {
	sp, err := ParseSpec(spec)
	if err != nil {
		return nil, err
	}
	if sp.Kind == KindDevice {
		t, err := linuxtpm.Open(sp.Path)
		if err != nil {
			return nil, fmt.Errorf("TPM device %s: %w (is it a TPM 2.0 device, and may this user open it?)", sp.Path, err)
		}
		return t, nil
	}
	return OpenSocket(sp.Path, sp.Ctrl)
}

// OpenSocket opens the TPM of a swtpm or nkp-swtpm through its data socket, and starts
// it as Open describes; ctrlPath is its control socket, or "" when the TPM is known to
// be powered on (e.g. started with --flags not-need-init or startup-clear).
func OpenSocket(dataPath, ctrlPath string) (transport.TPMCloser, error) {
	c, err := net.DialTimeout("unix", dataPath, dialTimeout)
	if err != nil {
		return nil, fmt.Errorf("swtpm data socket %s: %w (is swtpm running with --server type=unixio,path=%s?)", dataPath, err, dataPath)
	}
	s := &socketTPM{conn: c, path: dataPath}
	if err := s.start(ctrlPath); err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

// TPM 2.0 response codes that Open's start-up handles.
const (
	rcSuccess    = 0x000
	rcInitialize = 0x100 // TPM_RC_INITIALIZE: TPM2_Startup was sent already
	rcFailure    = 0x101 // TPM_RC_FAILURE: swtpm's answer while the TPM is not powered on
)

// startupClear is TPM2_Startup(TPM_SU_CLEAR).
var startupClear = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}

// start sends TPM2_Startup(CLEAR), powering the TPM on through ctrlPath first if it
// answers that it is not running.
func (s *socketTPM) start(ctrlPath string) error {
	rc, err := s.startup()
	if err != nil {
		return err
	}
	if rc == rcFailure {
		if ctrlPath == "" {
			return fmt.Errorf("swtpm %s: the TPM is not powered on (TPM_RC_FAILURE to TPM2_Startup); name its control socket (swtpm:path=%s,ctrl=CTRL_SOCKET), send CMD_INIT (swtpm_ioctl -i), or start it with --flags not-need-init,startup-clear", s.path, s.path)
		}
		if err := powerOn(ctrlPath); err != nil {
			return fmt.Errorf("swtpm %s: %w", s.path, err)
		}
		if rc, err = s.startup(); err != nil {
			return err
		}
	}
	if rc != rcSuccess && rc != rcInitialize {
		return fmt.Errorf("swtpm %s: TPM2_Startup(CLEAR) answered %#x; the TPM cannot be used (see its log)", s.path, rc)
	}
	return nil
}

func (s *socketTPM) startup() (uint32, error) {
	rsp, err := s.Send(startupClear)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(rsp[6:10]), nil
}

// powerOn sends CMD_INIT on the control socket and checks its result.
func powerOn(ctrlPath string) error {
	c, err := net.DialTimeout("unix", ctrlPath, dialTimeout)
	if err != nil {
		return fmt.Errorf("control socket %s: %w (is swtpm running with --ctrl type=unixio,path=%s?)", ctrlPath, err, ctrlPath)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(CommandTimeout)); err != nil {
		return fmt.Errorf("control socket %s: %w", ctrlPath, err)
	}
	if _, err := c.Write(ctrl.Init{}.Marshal()); err != nil {
		return fmt.Errorf("control socket %s: sending CMD_INIT: %w", ctrlPath, err)
	}
	var res [4]byte
	if _, err := io.ReadFull(c, res[:]); err != nil {
		return fmt.Errorf("control socket %s: reading the CMD_INIT result: %w", ctrlPath, err)
	}
	if r := binary.BigEndian.Uint32(res[:]); r != 0 {
		return fmt.Errorf("control socket %s: CMD_INIT failed with %#x (the state could not be loaded: a wrong key or damaged state files? see the swtpm log)", ctrlPath, r)
	}
	return nil
}

// socketTPM carries TPM commands over a stream socket: each command is written whole
// and exactly one response is read back (header, then the size the header gives), so a
// response split across reads arrives in one piece. The mutex keeps commands and
// responses of concurrent callers paired.
type socketTPM struct {
	mu   sync.Mutex
	conn net.Conn
	path string
}

// Send implements transport.TPM.
func (s *socketTPM) Send(cmd []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.conn.SetDeadline(time.Now().Add(CommandTimeout)); err != nil {
		return nil, fmt.Errorf("swtpm %s: %w", s.path, err)
	}
	if _, err := s.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("swtpm %s: sending a command: %w", s.path, err)
	}
	var hdr [10]byte
	if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
		return nil, fmt.Errorf("swtpm %s: reading a response header: %w", s.path, err)
	}
	size := int(binary.BigEndian.Uint32(hdr[2:6]))
	if size < len(hdr) || size > MaxResponse {
		return nil, fmt.Errorf("swtpm %s: response size %d out of range [10, %d]", s.path, size, MaxResponse)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr[:])
	if _, err := io.ReadFull(s.conn, rsp[len(hdr):]); err != nil {
		return nil, fmt.Errorf("swtpm %s: reading a %d-byte response: %w", s.path, size, err)
	}
	return rsp, nil
}

// Close implements io.Closer.
func (s *socketTPM) Close() error {
	if err := s.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("swtpm %s: %w", s.path, err)
	}
	return nil
}

// ReadWriter adapts a TPM to the io.ReadWriter that go-tpm-tools' client and go-tpm's
// legacy tpm2 package take: Write sends one command, the next Read returns its response
// with a nil error (later Reads, until the next Write, return io.EOF). A Read into a
// buffer smaller than the response fails with io.ErrShortBuffer (and drops the
// response) instead of cutting it.
func ReadWriter(t transport.TPM) io.ReadWriter { return &readWriter{tpm: t} }

type readWriter struct {
	tpm transport.TPM
	rsp []byte
}

func (rw *readWriter) Write(cmd []byte) (int, error) {
	rw.rsp = nil
	rsp, err := rw.tpm.Send(cmd)
	if err != nil {
		return 0, err
	}
	rw.rsp = rsp
	return len(cmd), nil
}

func (rw *readWriter) Read(p []byte) (int, error) {
	if rw.rsp == nil {
		return 0, io.EOF
	}
	if len(p) < len(rw.rsp) {
		n := len(rw.rsp)
		rw.rsp = nil
		return 0, fmt.Errorf("TPM response of %d bytes for a %d-byte buffer (dropped): %w", n, len(p), io.ErrShortBuffer)
	}
	n := copy(p, rw.rsp)
	rw.rsp = nil
	return n, nil
}
