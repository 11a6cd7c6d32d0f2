package swtpm

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/test/e2e"
)

// startRealSwtpm runs Debian's swtpm on a unix control socket over a fresh state
// directory and returns the control socket's path.
func startRealSwtpm(t *testing.T) string {
	t.Helper()
	e2e.Require(t, "swtpm")
	dir := shortDir(t)
	sock := filepath.Join(dir, "swtpm.ctrl")
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--ctrl", "type=unixio,path="+sock,
		"--tpmstate", "dir="+dir,
		"--log", "file="+filepath.Join(dir, "swtpm.log"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Error("swtpm did not exit 10 s after SIGKILL")
		}
	})
	e2e.WaitFor(t, 5*time.Second, "swtpm's control socket", func() bool {
		c, err := net.Dial("unix", sock)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	return sock
}

// exchange writes msg and returns every byte the server sends back: it waits up to
// 3 s for the first byte (swtpm itself waits 500 ms for a truncated request), then
// until the server has been quiet for 50 ms.
func exchange(t *testing.T, c net.Conn, msg []byte) []byte {
	t.Helper()
	c.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write %x: %v", msg, err)
	}
	var out []byte
	buf := make([]byte, 64<<10)
	wait := 3 * time.Second
	for {
		c.SetReadDeadline(time.Now().Add(wait))
		n, err := c.Read(buf)
		out = append(out, buf[:n]...)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return out
			}
			return append(out, []byte("<closed>")...)
		}
		wait = 50 * time.Millisecond
	}
}

// Differential test: the same control messages, byte for byte, to Debian's swtpm 0.7.1
// and to nkp's server over the same libtpms; the replies must be identical except
// where swtpm 0.7.1 predates a feature (the capability mask, LOCK_STORAGE) or the
// content is random (state blobs).
func TestDifferentialAgainstSwtpm(t *testing.T) {
	swtpmSock := startRealSwtpm(t)
	eng, d := realTPM(t, shortDir(t), nil)
	h := startServerWith(t, eng, d, nil)

	dialBoth := func() (theirs, ours *ctrlClient) {
		c, err := net.Dial("unix", swtpmSock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return &ctrlClient{t: t, c: c.(*net.UnixConn)}, h.dialCtrl()
	}
	theirs, ours := dialBoth()

	const (
		exact = iota
		sameLength
		sameResult // first 4 bytes
		known      // a documented difference: both must answer, nothing more
	)
	type step struct {
		name    string
		msg     []byte
		compare int
	}
	steps := []step{
		{"GET_CAPABILITY (0.7.1: 0xffff, HEAD: 0x1ffff)", ctrl.GetCapability{}.Marshal(), sameLength},
		{"GET_TPMESTABLISHED while stopped", ctrl.GetEstablished{}.Marshal(), exact},
		{"HASH_DATA while stopped", ctrl.HashData{Data: []byte("x")}.Marshal(), exact},
		{"GET_STATEBLOB while stopped", ctrl.GetStateBlob{Type: ctrl.BlobPermanent}.Marshal(), exact},
		{"STORE_VOLATILE while stopped", ctrl.StoreVolatile{}.Marshal(), exact},
		{"SET_LOCALITY 5", ctrl.SetLocality{Loc: 5}.Marshal(), exact},
		{"SET_LOCALITY 3 unpadded", ctrl.SetLocality{Loc: 3}.Marshal(), exact},
		{"SET_LOCALITY 0 padded", ctrl.SetLocality{Loc: 0, Padded: true}.Marshal(), exact},
		{"STOP with a body", []byte{0, 0, 0, 0x0e, 0}, exact},
		{"INIT with 5 body bytes", []byte{0, 0, 0, 2, 0, 0, 0, 0, 0}, exact},
		{"INIT truncated: closed without a reply", []byte{0, 0, 0, 2, 0}, exact},
		{"HASH_DATA truncated: closed without a reply", []byte{0, 0, 0, 7, 0, 0, 0, 9, 1}, exact},
		{"SET_LOCALITY without body: closed without a reply", []byte{0, 0, 0, 5}, exact},
		{"SET_BUFFERSIZE without body: BAD_PARAMETER", []byte{0, 0, 0, 0x11}, exact},
		{"GET_INFO with half a body: BAD_PARAMETER", []byte{0, 0, 0, 0x12, 0, 0, 0, 0, 0, 0, 0, 1}, exact},
		{"unknown command", []byte{0, 0, 0, 0x42}, exact},
		{"SET_DATAFD without fd", ctrl.SetDataFD{}.Marshal(), exact},
		{"SET_BUFFERSIZE query", ctrl.SetBufferSize{}.Marshal(), exact},
		{"SET_BUFFERSIZE 3968 stopped", ctrl.SetBufferSize{Size: 3968}.Marshal(), exact},
		{"SET_BUFFERSIZE 100000 clamps", ctrl.SetBufferSize{Size: 100000}.Marshal(), exact},
		{"GET_CONFIG", ctrl.GetConfig{}.Marshal(), exact},
		{"GET_INFO spec", ctrl.GetInfo{Flags: 1}.Marshal(), exact},
		{"GET_INFO attributes", ctrl.GetInfo{Flags: 2}.Marshal(), exact},
		{"GET_INFO offset 5", ctrl.GetInfo{Flags: 1, Offset: 5}.Marshal(), exact},
		{"GET_INFO offset past end", ctrl.GetInfo{Flags: 1, Offset: 4000}.Marshal(), exact},
		{"INIT", ctrl.Init{}.Marshal(), exact},
		{"INIT again", ctrl.Init{}.Marshal(), exact},
		{"SET_BUFFERSIZE while running", ctrl.SetBufferSize{Size: 4096}.Marshal(), exact},
		{"SET_BUFFERSIZE without body while running", []byte{0, 0, 0, 0x11}, exact},
		{"SET_STATEBLOB while running", ctrl.SetStateBlob{Type: ctrl.BlobPermanent}.Marshal(), exact},
		{"GET_TPMESTABLISHED", ctrl.GetEstablished{}.Marshal(), exact},
		{"RESET_TPMESTABLISHED loc 0", ctrl.ResetEstablished{Loc: 0}.Marshal(), exact},
		{"RESET_TPMESTABLISHED loc 3 padded", ctrl.ResetEstablished{Loc: 3, Padded: true}.Marshal(), exact},
		{"RESET_TPMESTABLISHED loc 7", ctrl.ResetEstablished{Loc: 7}.Marshal(), exact},
		{"HASH_START", ctrl.HashStart{}.Marshal(), exact},
		{"HASH_DATA", ctrl.HashData{Data: bytes.Repeat([]byte("a"), 1000)}.Marshal(), exact},
		{"HASH_END", ctrl.HashEnd{}.Marshal(), exact},
		{"GET_TPMESTABLISHED after HASH_END", ctrl.GetEstablished{}.Marshal(), exact},
		{"CANCEL", ctrl.CancelTPMCmd{}.Marshal(), exact},
		{"STORE_VOLATILE", ctrl.StoreVolatile{}.Marshal(), exact},
		{"GET_STATEBLOB savestate", ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: ctrl.BlobSaveState}.Marshal(), exact},
		{"GET_STATEBLOB permanent", ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: ctrl.BlobPermanent}.Marshal(), sameResult},
		{"LOCK_STORAGE (0.7.1: BAD_ORDINAL)", ctrl.LockStorage{Retries: 1}.Marshal(), known},
		{"GET_STATEBLOB unknown type", ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: 7}.Marshal(), exact},
		{"STOP", ctrl.Stop{}.Marshal(), exact},
		{"GET_TPMESTABLISHED after STOP", ctrl.GetEstablished{}.Marshal(), exact},
		{"SET_STATEBLOB garbage", ctrl.SetStateBlob{Type: ctrl.BlobVolatile, Data: []byte("not an envelope at all")}.Marshal(), exact},
		{"SET_STATEBLOB bad version", ctrl.SetStateBlob{Type: ctrl.BlobVolatile, Data: []byte{9, 9, 0, 10, 0, 4, 0, 0, 0, 10}}.Marshal(), exact},
		{"SET_STATEBLOB unknown type", ctrl.SetStateBlob{Type: 9, Data: []byte{2, 1, 0, 10, 0, 4, 0, 0, 0, 10}}.Marshal(), exact},
		{"SET_STATEBLOB empty", ctrl.SetStateBlob{Type: ctrl.BlobVolatile}.Marshal(), exact},
	}
	// Every command code alone, without its body, before anything else (the TPM is
	// stopped): swtpm answers some at once, waits for the rest of others and closes
	// without a reply; SHUTDOWN would end it.
	var bare []step
	for code := ctrl.Code(1); code <= 0x14; code++ {
		compare := exact
		switch code {
		case ctrl.CmdShutdown:
			continue
		case ctrl.CmdGetCapability:
			compare = sameLength
		case ctrl.CmdLockStorage:
			compare = known
		}
		bare = append(bare, step{fmt.Sprintf("%v alone", code), []byte{0, 0, 0, byte(code)}, compare})
	}
	steps = append(bare, steps...)
	for _, s := range steps {
		a := exchange(t, theirs.c, s.msg)
		b := exchange(t, ours.c, s.msg)
		ok := true
		switch s.compare {
		case exact:
			ok = bytes.Equal(a, b)
		case sameLength:
			ok = len(a) == len(b)
		case sameResult:
			ok = len(a) >= 4 && len(b) >= 4 && bytes.Equal(a[:4], b[:4])
		case known:
			ok = len(a) == 4 && len(b) == 4
		}
		if !ok {
			t.Errorf("%s (%x):\n swtpm: %q\n nkp:   %q", s.name, s.msg, a, b)
		}
		if bytes.HasSuffix(a, []byte("<closed>")) || bytes.HasSuffix(b, []byte("<closed>")) {
			theirs, ours = dialBoth()
		}
	}
	// The data channel: QEMU's probe before INIT, then TPM commands, through SET_DATAFD.
	theirs.result(ctrl.Stop{})
	ours.result(ctrl.Stop{})
	_, td := theirs.setDataFD()
	_, od := ours.setDataFD()
	dataSteps := []struct {
		name    string
		before  ctrl.Request
		msg     []byte
		compare int
	}{
		{"probe while stopped", nil, cmdReadClock, exact},
		{"Startup", ctrl.Init{}, cmdStartupClear, exact},
		{"Startup twice", nil, cmdStartupClear, exact},
		{"GetRandom", nil, cmdGetRandom8, sameResult},
		{"unknown command code", nil, tpmCommand(0x7777, nil), exact},
		{"TPM2_SetLocality not allowed", nil, tpmCommand(0x20001000, []byte{1}), exact},
		{"TPM_SEND_COMMAND prefix", nil, append([]byte{0, 0, 0, 8, 0, 0, 0, 0, 12}, cmdGetRandom8...), sameLength},
	}
	for _, s := range dataSteps {
		if s.before != nil {
			theirs.result(s.before)
			ours.result(s.before)
		}
		a := exchange(t, td, s.msg)
		b := exchange(t, od, s.msg)
		ok := bytes.Equal(a, b)
		switch s.compare {
		case sameLength:
			ok = len(a) == len(b)
		case sameResult:
			ok = len(a) == len(b) && len(a) >= 10 && bytes.Equal(a[:10], b[:10])
		}
		if !ok {
			t.Errorf("data %s (%x):\n swtpm: %x\n nkp:   %x", s.name, s.msg, a, b)
		}
	}
	closeReal(t, h, eng, d)
}
