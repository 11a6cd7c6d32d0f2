package swtpm

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
)

// ioTimeout bounds every test read and write, so a broken server fails a test instead
// of hanging it.
const ioTimeout = 5 * time.Second

type harness struct {
	t        *testing.T
	eng      *fakeEngine
	store    *memStore
	srv      *Server
	dir      string
	ctrlPath string
	cancel   context.CancelFunc
	done     chan error
}

// shortDir returns a directory whose paths fit in a unix socket address.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nkpsrv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startServer serves a fake engine on a unix control socket; mod adjusts the Config.
func startServer(t *testing.T, mod func(*Config)) *harness {
	t.Helper()
	store := newMemStore()
	return startServerWith(t, newFakeEngine(store), store, mod)
}

func startServerWith(t *testing.T, eng Engine, store Store, mod func(*Config)) *harness {
	t.Helper()
	return startServerHooked(t, eng, store, mod, nil)
}

// startServerHooked is startServerWith with hook called on the server before Serve.
func startServerHooked(t *testing.T, eng Engine, store Store, mod func(*Config), hook func(*Server)) *harness {
	t.Helper()
	h := &harness{t: t, dir: shortDir(t), done: make(chan error, 1)}
	if fe, ok := eng.(*fakeEngine); ok {
		h.eng = fe
	}
	if ms, ok := store.(*memStore); ok {
		h.store = ms
	}
	h.ctrlPath = filepath.Join(h.dir, "ctrl")
	l, err := net.Listen("unix", h.ctrlPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Engine: eng, Store: store, Log: testLogger(t), CtrlListener: l}
	if mod != nil {
		mod(&cfg)
	}
	h.srv, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if hook != nil {
		hook(h.srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-h.done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return within 10 s of cancel")
		}
	})
	return h
}

// waitDone waits for Serve to return on its own.
func (h *harness) waitDone() error {
	h.t.Helper()
	select {
	case err := <-h.done:
		h.done <- err // for Cleanup
		return err
	case <-time.After(10 * time.Second):
		h.t.Fatal("Serve did not return within 10 s")
		return nil
	}
}

type ctrlClient struct {
	t *testing.T
	c *net.UnixConn
}

func (h *harness) dialCtrl() *ctrlClient {
	h.t.Helper()
	c, err := net.Dial("unix", h.ctrlPath)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.Close() })
	return &ctrlClient{t: h.t, c: c.(*net.UnixConn)}
}

// do sends req and reads its response as a client does.
func (c *ctrlClient) do(req ctrl.Request) ctrl.Response {
	c.t.Helper()
	c.write(req.Marshal())
	c.c.SetReadDeadline(time.Now().Add(ioTimeout))
	resp, err := ctrl.ReadResponse(c.c, req.Code())
	if err != nil {
		c.t.Fatalf("%v: %v", req.Code(), err)
	}
	return resp
}

// result sends req and returns the result code of its response.
func (c *ctrlClient) result(req ctrl.Request) ctrl.Result {
	c.t.Helper()
	switch r := c.do(req).(type) {
	case ctrl.ResultResponse:
		return r.Result
	case ctrl.StateBlobResponse:
		return r.Result
	case ctrl.CapabilityResponse:
		return ctrl.ResSuccess
	case ctrl.EstablishedResponse:
		return r.Result
	case ctrl.ConfigResponse:
		return r.Result
	case ctrl.BufferSizeResponse:
		return r.Result
	case ctrl.InfoResponse:
		return r.Result
	}
	c.t.Fatalf("unexpected response type to %v", req.Code())
	return 0
}

func (c *ctrlClient) write(b []byte) {
	c.t.Helper()
	c.c.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

// readN reads exactly n bytes.
func (c *ctrlClient) readN(n int) []byte {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(ioTimeout))
	b := make([]byte, n)
	if _, err := io.ReadFull(c.c, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// setDataFD makes a socketpair, passes one end with SET_DATAFD as QEMU does, and
// returns the result and the other end.
func (c *ctrlClient) setDataFD() (ctrl.Result, net.Conn) {
	c.t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		c.t.Fatal(err)
	}
	defer unix.Close(fds[1])
	f := os.NewFile(uintptr(fds[0]), "qemu-end")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { conn.Close() })
	if _, _, err := c.c.WriteMsgUnix(ctrl.SetDataFD{}.Marshal(), unix.UnixRights(fds[1]), nil); err != nil {
		c.t.Fatal(err)
	}
	c.c.SetReadDeadline(time.Now().Add(ioTimeout))
	resp, err := ctrl.ReadResponse(c.c, ctrl.CmdSetDataFD)
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.(ctrl.ResultResponse).Result, conn
}

// tpmCall sends one TPM command on a data connection and reads the response as QEMU
// does: 10 bytes of header, then the rest.
func tpmCall(t *testing.T, c net.Conn, cmd []byte) []byte {
	t.Helper()
	c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Write(cmd); err != nil {
		t.Fatalf("data write: %v", err)
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatalf("data read: %v", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:])
	if size < 10 || size > 1<<16 {
		t.Fatalf("response size %d", size)
	}
	resp := make([]byte, size)
	copy(resp, hdr)
	if _, err := io.ReadFull(c, resp[10:]); err != nil {
		t.Fatalf("data read: %v", err)
	}
	return resp
}

func tpmCommand(cc uint32, params []byte) []byte {
	b := make([]byte, 10+len(params))
	binary.BigEndian.PutUint16(b, 0x8001)
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	binary.BigEndian.PutUint32(b[6:], cc)
	copy(b[10:], params)
	return b
}

func rcOf(resp []byte) uint32 { return binary.BigEndian.Uint32(resp[6:]) }

var (
	cmdStartupClear = tpmCommand(0x144, []byte{0, 0})
	cmdShutdownSt   = tpmCommand(0x145, []byte{0, 1})
	cmdGetRandom8   = tpmCommand(0x17b, []byte{0, 8})
	cmdReadClock    = tpmCommand(0x181, nil)
	cmdNVRead       = tpmCommand(ccNVRead, nil)
)

func cmdNVWrite(v string) []byte { return tpmCommand(ccNVWrite, []byte(v)) }

// contains reports whether calls has s.
func contains(calls []string, s string) bool {
	for _, c := range calls {
		if c == s {
			return true
		}
	}
	return false
}

func count(calls []string, s string) int {
	n := 0
	for _, c := range calls {
		if c == s {
			n++
		}
	}
	return n
}
