package swtpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/data"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
	"github.com/nkp-dev/nkp/test/e2e"
)

// dataEngines are the two data paths: the server's Go loop (an engine without its own,
// the fake) and libtpms' C loop (ServeConn). The data-channel behaviour must be the same.
var dataEngines = []struct {
	name string
	real bool
}{
	{"go-loop/fake", false},
	{"c-loop/libtpms", true},
}

// startDataServer serves the chosen engine with a unix data listener; mod adjusts the
// Config. It returns the harness and the data socket's path.
func startDataServer(t *testing.T, real bool, mod func(*Config)) (*harness, string) {
	t.Helper()
	dir := shortDir(t)
	path := filepath.Join(dir, "data")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	withData := func(c *Config) {
		c.DataListener = l
		if mod != nil {
			mod(c)
		}
	}
	if !real {
		return startServer(t, withData), path
	}
	store := newMemStore()
	eng, err := libtpms.Open(store)
	if err != nil {
		if errors.Is(err, libtpms.ErrNoCgo) {
			e2e.Unavailable(t, "the real TPM engine needs cgo and libtpms-dev: "+err.Error())
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	h := startServerWith(t, eng, store, withData)
	h.store = store
	return h, path
}

func dialData(t *testing.T, path string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(ioTimeout))
	return c
}

// readEOF checks that the server closed c (after what was already read).
func readEOF(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	if n, err := c.Read(make([]byte, 64)); err != io.EOF {
		t.Fatalf("%s: read %d bytes, %v; want EOF", what, n, err)
	}
}

func readN(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v (got %x)", n, err, b)
	}
	return b
}

func prefixed(loc byte, cmd []byte) []byte {
	p := []byte{0, 0, 0, 8, loc, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(p[5:], uint32(len(cmd)))
	return append(p, cmd...)
}

// pcrExtend21 is TPM2_PCR_Extend of PCR 21 (SHA-256, password session). The PC
// client profile lets only locality 2 extend PCR 21, so it shows which locality the
// TPM applies.
func pcrExtend21() []byte {
	b := []byte{0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x82, 0, 0, 0, 21}
	b = append(b, 0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0) // TPM_RS_PW, empty nonce and auth
	b = append(b, 0, 0, 0, 1, 0, 0x0b)                      // one SHA-256 digest
	b = append(b, bytes.Repeat([]byte{0x21}, 32)...)
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

// The data channel behaves the same on both data paths: framing, the prefix and its
// locality, the vendor locality command, refused sizes, a stalled command, a stopped
// TPM, disconnect, terminate, and an NV change acknowledged only once stored.
func TestDataChannelBothLoops(t *testing.T) {
	launch := func(c *Config) { c.NotNeedInit = true; c.Startup = StartupClear }
	tests := []struct {
		name     string
		realOnly bool // needs a real TPM's answers
		mod      func(*Config)
		run      func(t *testing.T, h *harness, path string)
	}{
		{"split command", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write(cmdGetRandom8[:3])
			time.Sleep(20 * time.Millisecond) // let the first part arrive alone
			if resp := tpmCall(t, dc, cmdGetRandom8[3:]); rcOf(resp) != 0 || len(resp) != 20 {
				t.Fatalf("split command: %x", resp)
			}
		}},
		{"two commands in one write", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write(append(append([]byte{}, cmdGetRandom8...), cmdGetRandom8...))
			both := readN(t, dc, 40)
			if rcOf(both) != 0 || rcOf(both[20:]) != 0 || be32(both[2:]) != 20 {
				t.Fatalf("two commands in one write: %x", both)
			}
		}},
		{"prefixed command: framed reply", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write(prefixed(0, cmdGetRandom8))
			framed := readN(t, dc, 4+20+4)
			if be32(framed) != 20 || be32(framed[24:]) != 0 || rcOf(framed[4:]) != 0 {
				t.Fatalf("prefixed reply = %x", framed)
			}
		}},
		{"prefix locality out of range", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write(prefixed(5, cmdGetRandom8))
			framed := readN(t, dc, 4+10+4)
			if rcOf(framed[4:]) != data.RCLocality {
				t.Fatalf("locality 5: %x, want TPM_RC_LOCALITY", framed)
			}
		}},
		{"prefix locality 4 rejected", false, func(c *Config) { launch(c); c.RejectLocality4 = true }, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write(prefixed(4, cmdGetRandom8))
			if framed := readN(t, dc, 18); rcOf(framed[4:]) != data.RCLocality {
				t.Fatalf("locality 4 with reject-locality-4: %x", framed)
			}
		}},
		{"prefix locality applies and sticks", true, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			if rc := rcOf(tpmCall(t, dc, pcrExtend21())); rc != data.RCLocality {
				t.Fatalf("PCR 21 extend at locality 0: rc %#x, want TPM_RC_LOCALITY", rc)
			}
			dc.Write(prefixed(2, pcrExtend21()))
			if framed := readN(t, dc, 4+19+4); rcOf(framed[4:]) != 0 {
				t.Fatalf("PCR 21 extend at prefix locality 2: %x", framed)
			}
			if rc := rcOf(tpmCall(t, dc, pcrExtend21())); rc != 0 {
				t.Fatalf("PCR 21 extend after the prefix: rc %#x, want the locality kept", rc)
			}
		}},
		{"vendor SetLocality not allowed", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			if rc := rcOf(tpmCall(t, dc, tpmCommand(data.CCSetLocality, []byte{2}))); rc != data.RCFailure {
				t.Fatalf("rc %#x, want TPM_RC_FAILURE", rc)
			}
		}},
		{"vendor SetLocality allowed", false, func(c *Config) { launch(c); c.AllowSetLocality = true }, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			for _, tt := range []struct {
				cmd []byte
				rc  uint32
			}{
				{tpmCommand(data.CCSetLocality, []byte{5}), data.RCLocality},
				{tpmCommand(data.CCSetLocality, nil), data.RCInsufficient},
				{tpmCommand(data.CCSetLocality, []byte{2}), 0},
			} {
				if rc := rcOf(tpmCall(t, dc, tt.cmd)); rc != tt.rc {
					t.Fatalf("%x: rc %#x, want %#x", tt.cmd, rc, tt.rc)
				}
			}
			if h.eng == nil { // the real TPM: locality 2 may extend PCR 21
				if rc := rcOf(tpmCall(t, dc, pcrExtend21())); rc != 0 {
					t.Fatalf("PCR 21 extend after TPM2_SetLocality(2): rc %#x", rc)
				}
			}
		}},
		{"oversized command", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write(tpmCommand(0x17b, make([]byte, 5000))[:10])
			if resp := readN(t, dc, 10); rcOf(resp) != data.RCCommandSize {
				t.Fatalf("oversized: %x", resp)
			}
			readEOF(t, dc, "after the oversized command")
		}},
		{"size below the header", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write([]byte{0x80, 0x01, 0, 0, 0, 5})
			if resp := readN(t, dc, 10); rcOf(resp) != data.RCCommandSize {
				t.Fatalf("undersized: %x", resp)
			}
			readEOF(t, dc, "after the undersized command")
		}},
		{"prefixed oversized command", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			dc.Write([]byte{0, 0, 0, 8, 0, 0, 1, 0, 0})
			if framed := readN(t, dc, 18); be32(framed) != 10 || rcOf(framed[4:]) != data.RCCommandSize {
				t.Fatalf("prefixed oversized: %x", framed)
			}
			readEOF(t, dc, "after the prefixed oversized command")
		}},
		{"stalled command closed without a reply", false, func(c *Config) { launch(c); c.MessageTimeout = 100 * time.Millisecond }, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			start := time.Now()
			dc.Write(cmdGetRandom8[:7])
			readEOF(t, dc, "a stalled command")
			if d := time.Since(start); d < 90*time.Millisecond {
				t.Fatalf("closed after %v, before the 100 ms message timeout", d)
			}
			// The next client is served.
			if rc := rcOf(tpmCall(t, dialData(t, path), cmdGetRandom8)); rc != 0 {
				t.Fatalf("next client: rc %#x", rc)
			}
		}},
		{"stopped TPM answers TPM_RC_FAILURE", false, nil, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			if resp := tpmCall(t, dc, cmdReadClock); !bytes.Equal(resp, data.NotRunningResponse()) {
				t.Fatalf("before INIT: %x", resp)
			}
			c := h.dialCtrl()
			c.result(ctrl.Init{})
			if rc := rcOf(tpmCall(t, dc, cmdStartupClear)); rc != 0 {
				t.Fatalf("Startup after INIT: rc %#x", rc)
			}
			c.result(ctrl.Stop{})
			if resp := tpmCall(t, dc, cmdGetRandom8); !bytes.Equal(resp, data.NotRunningResponse()) {
				t.Fatalf("after STOP: %x", resp)
			}
		}},
		{"disconnect after each response", false, func(c *Config) { launch(c); c.Disconnect = true }, func(t *testing.T, h *harness, path string) {
			for i := range 2 {
				dc := dialData(t, path)
				if rc := rcOf(tpmCall(t, dc, cmdGetRandom8)); rc != 0 {
					t.Fatalf("client %d: rc %#x", i, rc)
				}
				readEOF(t, dc, "after the response")
			}
		}},
		{"automatic Shutdown after a data command", false, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			tpmCall(t, dc, cmdGetRandom8)
			c := h.dialCtrl()
			c.result(ctrl.Stop{})
			if h.eng != nil {
				if got := count(h.eng.Calls(), "Shutdown 1"); got != 1 {
					t.Fatalf("Shutdown(STATE) sent %d times: %q", got, h.eng.Calls())
				}
				return
			}
			// The real TPM: the automatic Shutdown(STATE) at STOP lets the TPM resume
			// with Startup(STATE).
			c.result(ctrl.Init{})
			if rc := rcOf(tpmCall(t, dc, tpmCommand(0x144, []byte{0, 1}))); rc != 0 {
				t.Fatalf("Startup(STATE) after STOP: rc %#x, want the state saved by an automatic Shutdown", rc)
			}
		}},
		{"no automatic Shutdown after the guest's own", true, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			if rc := rcOf(tpmCall(t, dc, tpmCommand(0x145, []byte{0, 0}))); rc != 0 {
				t.Fatalf("Shutdown(CLEAR): rc %#x", rc)
			}
			c := h.dialCtrl()
			c.result(ctrl.Stop{})
			c.result(ctrl.Init{})
			// Had the server added its Shutdown(STATE), Startup(STATE) would work.
			if rc := rcOf(tpmCall(t, dc, tpmCommand(0x144, []byte{0, 1}))); rc == 0 {
				t.Fatal("Startup(STATE) worked after the guest's Shutdown(CLEAR): the server sent its own Shutdown(STATE) after it")
			}
		}},
		{"NV change not acknowledged when the store fails", true, launch, func(t *testing.T, h *harness, path string) {
			dc := dialData(t, path)
			tpm := conn{dc}
			nvDefineWrite(t, tpm, []byte("one"))
			h.store.setFail(errors.New("disk full"))
			dc.SetDeadline(time.Now().Add(ioTimeout))
			resp := tpmCall(t, dc, nvWriteCmd(t, tpm, []byte("two")))
			if rcOf(resp) == 0 {
				t.Fatal("NV write acknowledged although the store failed")
			}
			if resp := tpmCall(t, dc, cmdGetRandom8); rcOf(resp) == 0 {
				t.Fatalf("after a failed store the TPM answered %x; want failure mode", resp)
			}
		}},
	}
	for _, eng := range dataEngines {
		for _, tt := range tests {
			if tt.realOnly && !eng.real {
				continue
			}
			t.Run(eng.name+"/"+tt.name, func(t *testing.T) {
				h, path := startDataServer(t, eng.real, tt.mod)
				tt.run(t, h, path)
			})
		}
	}
}

// SET_DATAFD and --terminate on the C loop: the fd QEMU passes is served, a hang-up
// ends Serve, and the socket is gone from the process.
func TestCLoopSetDataFDTerminate(t *testing.T) {
	store := newMemStore()
	eng, err := libtpms.Open(store)
	if err != nil {
		if errors.Is(err, libtpms.ErrNoCgo) {
			e2e.Unavailable(t, err.Error())
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	before := openFDs(t)
	h := startServerWith(t, eng, store, func(c *Config) { c.Terminate = true })
	c := h.dialCtrl()
	c.result(ctrl.Init{})
	res, dc := c.setDataFD()
	if res != ctrl.ResSuccess {
		t.Fatalf("SET_DATAFD = %v", res)
	}
	if rc := rcOf(tpmCall(t, dc, cmdStartupClear)); rc != 0 {
		t.Fatalf("Startup: rc %#x", rc)
	}
	res2, dc2 := c.setDataFD()
	dc2.Close()
	if res2 != ctrl.ResIOError {
		t.Fatalf("second SET_DATAFD while one is served = %v, want IOERROR", res2)
	}
	dc.Close()
	if err := h.waitDone(); err != nil {
		t.Fatal(err)
	}
	c.c.Close()
	if after := openFDs(t); after > before {
		t.Fatalf("%d fds open after Serve, %d before: a data socket leaked", after, before)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	return len(ents)
}

// capture is a go-tpm transport that keeps the command and sends nothing.
type capture struct{ cmd []byte }

func (c *capture) Send(cmd []byte) ([]byte, error) {
	c.cmd = append([]byte(nil), cmd...)
	return nil, errors.New("captured, not sent")
}

// nvWriteCmd returns the bytes of TPM2_NV_Write of value to nvIndex.
func nvWriteCmd(t *testing.T, tpm transport.TPM, value []byte) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: nvIndex}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_ReadPublic: %v", err)
	}
	var cp capture
	tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: nvIndex, Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: value},
	}.Execute(&cp)
	if cp.cmd == nil {
		t.Fatal("go-tpm built no NV_Write command")
	}
	return cp.cmd
}
