package swtpm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/data"
	"github.com/nkp-dev/nkp/swtpm/envelope"
)

func TestConfigValidate(t *testing.T) {
	store := newMemStore()
	eng := newFakeEngine(store)
	l := &net.UnixListener{}
	ok := Config{Engine: eng, Store: store, CtrlListener: l}
	tests := []struct {
		name  string
		mod   func(*Config)
		field string
	}{
		{"no engine", func(c *Config) { c.Engine = nil }, "Engine"},
		{"no store", func(c *Config) { c.Store = nil }, "Store"},
		{"no channel at all", func(c *Config) { c.CtrlListener = nil }, "CtrlListener"},
		{"data-only (swtpm without --ctrl)", func(c *Config) { c.CtrlListener = nil; c.DataListener = l }, ""},
		{"two control channels", func(c *Config) { c.CtrlConn = &net.UnixConn{} }, "CtrlConn"},
		{"two data channels", func(c *Config) { c.DataListener = l; c.DataConn = &net.UnixConn{} }, "DataConn"},
		{"deactivated", func(c *Config) { c.Startup = StartupDeactivated }, "Startup"},
		{"unknown startup", func(c *Config) { c.Startup = "warm" }, "Startup"},
		{"short state key", func(c *Config) { c.StateKey = make([]byte, 20) }, "StateKey"},
		{"short migration key", func(c *Config) { c.MigrationKey = make([]byte, 8) }, "MigrationKey"},
		{"negative timeout", func(c *Config) { c.MessageTimeout = -1 }, "MessageTimeout"},
		{"valid", func(c *Config) {}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := ok
			tt.mod(&cfg)
			err := cfg.Validate()
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Validate = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.field+":") {
				t.Fatalf("Validate = %v, want ErrConfig naming %s", err, tt.field)
			}
		})
	}
}

// QEMU's start, reset and first guest commands, then SHUTDOWN, in QEMU 7.2's order
// (spec §1.4), over SET_DATAFD.
func TestQEMUSequence(t *testing.T) {
	h := startServer(t, nil)
	c := h.dialCtrl()
	res, dc := c.setDataFD()
	if res != ctrl.ResSuccess {
		t.Fatalf("SET_DATAFD = %v", res)
	}
	// The version probe before INIT: exactly 10 bytes in one read.
	dc.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := dc.Write(cmdReadClock); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := dc.Read(buf)
	if err != nil || !bytes.Equal(buf[:n], data.NotRunningResponse()) {
		t.Fatalf("probe reply = %x (%v), want %x in one read", buf[:n], err, data.NotRunningResponse())
	}
	if caps := c.do(ctrl.GetCapability{}).(ctrl.CapabilityResponse).Caps; caps != ctrl.CapsTPM2Socket {
		t.Fatalf("caps = %#x, want %#x", caps, ctrl.CapsTPM2Socket)
	}
	steps := []struct {
		req  ctrl.Request
		want ctrl.Result
	}{
		{ctrl.Stop{}, ctrl.ResSuccess},
		{ctrl.SetBufferSize{}, ctrl.ResSuccess},
		{ctrl.Stop{}, ctrl.ResSuccess},
		{ctrl.SetBufferSize{Size: 3968}, ctrl.ResSuccess},
		{ctrl.Init{}, ctrl.ResSuccess},
		{ctrl.GetEstablished{}, ctrl.ResSuccess},
		{ctrl.SetLocality{Loc: 0, Padded: true}, ctrl.ResSuccess},
	}
	for _, s := range steps {
		if got := c.result(s.req); got != s.want {
			t.Fatalf("%v = %v, want %v", s.req.Code(), got, s.want)
		}
	}
	if bs := c.do(ctrl.SetBufferSize{}).(ctrl.BufferSizeResponse); bs.Size != 3968 || bs.Min != 2808 || bs.Max != 4096 {
		t.Fatalf("buffer size = %+v, want 3968 in [2808, 4096]", bs)
	}
	if rc := rcOf(tpmCall(t, dc, cmdStartupClear)); rc != 0 {
		t.Fatalf("Startup rc = %#x", rc)
	}
	if resp := tpmCall(t, dc, cmdGetRandom8); rcOf(resp) != 0 || len(resp) != 20 {
		t.Fatalf("GetRandom = %x", resp)
	}
	if got := c.result(ctrl.Shutdown{}); got != ctrl.ResSuccess {
		t.Fatalf("SHUTDOWN = %v", got)
	}
	if err := h.waitDone(); err != nil {
		t.Fatalf("Serve = %v", err)
	}
	calls := h.eng.Calls()
	if !contains(calls, "Shutdown 1") || !contains(calls, "Terminate") {
		t.Fatalf("no automatic TPM2_Shutdown(STATE) + Terminate before exit: %q", calls)
	}
	if !h.store.has("permall") {
		t.Fatal("permanent state not stored by the automatic shutdown")
	}
}

// Error replies are swtpm's: 4 bytes, the right code, and the connection stays usable.
func TestControlErrors(t *testing.T) {
	tests := []struct {
		name    string
		running bool
		mod     func(*Config)
		send    []byte
		want    ctrl.Result
	}{
		{"GET_TPMESTABLISHED stopped", false, nil, ctrl.GetEstablished{}.Marshal(), ctrl.ResBadOrdinal},
		{"GET_STATEBLOB stopped", false, nil, ctrl.GetStateBlob{Type: ctrl.BlobPermanent}.Marshal(), ctrl.ResBadOrdinal},
		{"STORE_VOLATILE stopped", false, nil, ctrl.StoreVolatile{}.Marshal(), ctrl.ResBadOrdinal},
		{"HASH_START stopped", false, nil, ctrl.HashStart{}.Marshal(), ctrl.ResBadOrdinal},
		{"CANCEL stopped", false, nil, ctrl.CancelTPMCmd{}.Marshal(), ctrl.ResBadOrdinal},
		{"SET_STATEBLOB running", true, nil, ctrl.SetStateBlob{Type: ctrl.BlobPermanent}.Marshal(), ctrl.ResBadOrdinal},
		{"SET_BUFFERSIZE running", true, nil, ctrl.SetBufferSize{Size: 4096}.Marshal(), ctrl.ResBadOrdinal},
		{"SET_LOCALITY 5", false, nil, ctrl.SetLocality{Loc: 5}.Marshal(), ctrl.ResBadLocality},
		{"SET_LOCALITY 4 rejected", false, func(c *Config) { c.RejectLocality4 = true }, ctrl.SetLocality{Loc: 4, Padded: true}.Marshal(), ctrl.ResBadLocality},
		{"RESET_TPMESTABLISHED loc 0", true, nil, ctrl.ResetEstablished{Loc: 0, Padded: true}.Marshal(), ctrl.ResBadLocality},
		{"RESET_TPMESTABLISHED loc 9", true, nil, ctrl.ResetEstablished{Loc: 9}.Marshal(), ctrl.ResBadLocality},
		{"unknown command", false, nil, []byte{0, 0, 0, 0x42}, ctrl.ResBadOrdinal},
		{"STOP with garbage", false, nil, []byte{0, 0, 0, 0x0e, 1, 2}, ctrl.ResBadParameter},
		{"INIT too long", false, nil, []byte{0, 0, 0, 2, 0, 0, 0, 0, 0}, ctrl.ResBadParameter},
		{"SET_DATAFD without fd", false, nil, ctrl.SetDataFD{}.Marshal(), ctrl.ResBadParameter},
		{"GET_INFO offset past end", false, nil, ctrl.GetInfo{Flags: 1, Offset: 1000}.Marshal(), ctrl.ResBadParameter},
		{"GET_STATEBLOB bad type", true, nil, nil, ctrl.ResRetry},
		{"SET_STATEBLOB garbage", false, nil, ctrl.SetStateBlob{Type: ctrl.BlobPermanent, Data: []byte("garbage!garbage!")}.Marshal(), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startServer(t, tt.mod)
			c := h.dialCtrl()
			if tt.running {
				if r := c.result(ctrl.Init{}); r != ctrl.ResSuccess {
					t.Fatalf("INIT = %v", r)
				}
			}
			switch {
			case tt.send == nil: // GET_STATEBLOB bad type carries the 16-byte header
				r := c.do(ctrl.GetStateBlob{Type: 7}).(ctrl.StateBlobResponse)
				if r.Result != tt.want {
					t.Fatalf("result %v, want %v", r.Result, tt.want)
				}
			case tt.want == 0: // any failure, 4 bytes
				c.write(tt.send)
				if got := ctrl.Result(be32(c.readN(4))); got == ctrl.ResSuccess {
					t.Fatal("garbage blob accepted")
				}
			default:
				c.write(tt.send)
				if got := ctrl.Result(be32(c.readN(4))); got != tt.want {
					t.Fatalf("reply %v, want %v", got, tt.want)
				}
			}
			// Nothing more than the 4 bytes came, and the connection still works.
			if caps := c.do(ctrl.GetCapability{}).(ctrl.CapabilityResponse).Caps; caps != ctrl.CapsTPM2Socket {
				t.Fatalf("after the error: caps %#x, the stream is out of sync", caps)
			}
		})
	}
}

func be32(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// A request cut short closes the connection after MessageTimeout without a reply, as
// swtpm does, and the next client is served; except SET_BUFFERSIZE, GET_INFO and
// LOCK_STORAGE, which swtpm reads once and answers BAD_PARAMETER (0x3) on the same
// connection (a script sending the bare command code sees that reply).
func TestTruncatedControlRequest(t *testing.T) {
	h := startServer(t, func(c *Config) { c.MessageTimeout = 100 * time.Millisecond })
	tests := []struct {
		name  string
		send  []byte
		reply []byte // nil: closed without a reply
	}{
		{"INIT without body", []byte{0, 0, 0, 2, 0}, nil},
		{"half a command code", []byte{0, 0}, nil},
		{"SET_LOCALITY without body", []byte{0, 0, 0, 5}, nil},
		{"SET_STATEBLOB cut in the payload", ctrl.SetStateBlob{Type: ctrl.BlobPermanent, Data: make([]byte, 100)}.Marshal()[:50], nil},
		{"HASH_DATA cut in the payload", ctrl.HashData{Data: make([]byte, 100)}.Marshal()[:20], nil},
		{"SET_BUFFERSIZE without body", []byte{0, 0, 0, 0x11}, []byte{0, 0, 0, 3}},
		{"GET_INFO with half a body", []byte{0, 0, 0, 0x12, 0, 0, 0, 0, 0, 0, 0, 1}, []byte{0, 0, 0, 3}},
		{"LOCK_STORAGE without body", []byte{0, 0, 0, 0x13}, []byte{0, 0, 0, 3}},
	}
	for _, tt := range tests {
		c := h.dialCtrl()
		c.write(tt.send)
		start := time.Now()
		c.c.SetReadDeadline(time.Now().Add(ioTimeout))
		if tt.reply != nil {
			got := make([]byte, len(tt.reply))
			if _, err := io.ReadFull(c.c, got); err != nil || !bytes.Equal(got, tt.reply) {
				t.Fatalf("%s: read %x, %v; want %x", tt.name, got, err, tt.reply)
			}
			// The connection stays in sync: the next request on it is answered.
			if caps := c.do(ctrl.GetCapability{}).(ctrl.CapabilityResponse).Caps; caps != ctrl.CapsTPM2Socket {
				t.Fatalf("%s: the next request on the connection got caps %#x", tt.name, caps)
			}
			c.c.Close()
			continue
		}
		if n, err := c.c.Read(make([]byte, 4)); err != io.EOF {
			t.Fatalf("%s: read %d bytes, %v; want the connection closed without a reply", tt.name, n, err)
		}
		if el := time.Since(start); el > 3*time.Second {
			t.Fatalf("%s: closed after %v; the bound is 100 ms", tt.name, el)
		}
		next := h.dialCtrl()
		if caps := next.do(ctrl.GetCapability{}).(ctrl.CapabilityResponse).Caps; caps != ctrl.CapsTPM2Socket {
			t.Fatalf("%s: the next client is not served", tt.name)
		}
		next.c.Close() // one control client at a time: let the next one in
	}
}

// Padded (QEMU) and unpadded (swtpm_ioctl, TSS) locality bodies both work and keep
// the stream in sync; the locality survives INIT.
func TestLocalityPaddedUnpaddedSticky(t *testing.T) {
	h := startServer(t, nil)
	c := h.dialCtrl()
	for _, req := range []ctrl.Request{
		ctrl.SetLocality{Loc: 3}, ctrl.SetLocality{Loc: 2, Padded: true}, ctrl.Init{},
	} {
		if r := c.result(req); r != ctrl.ResSuccess {
			t.Fatalf("%#v = %v", req, r)
		}
	}
	_, dc := c.setDataFD()
	tpmCall(t, dc, cmdStartupClear)
	if !contains(h.eng.Calls(), "Startup 0 loc 2") {
		t.Fatalf("Startup not at locality 2 after INIT: %q", h.eng.Calls())
	}
	for _, req := range []ctrl.Request{ctrl.ResetEstablished{Loc: 3}, ctrl.ResetEstablished{Loc: 4, Padded: true}} {
		if r := c.result(req); r != ctrl.ResSuccess {
			t.Fatalf("%#v = %v", req, r)
		}
	}
}

func TestHashSequenceSetsEstablished(t *testing.T) {
	h := startServer(t, nil)
	c := h.dialCtrl()
	c.result(ctrl.Init{})
	if c.do(ctrl.GetEstablished{}).(ctrl.EstablishedResponse).Bit {
		t.Fatal("established before the hash sequence")
	}
	for _, req := range []ctrl.Request{ctrl.HashStart{}, ctrl.HashData{Data: make([]byte, 4096)}, ctrl.HashData{Data: []byte("x")}, ctrl.HashEnd{}} {
		if r := c.result(req); r != ctrl.ResSuccess {
			t.Fatalf("%v = %v", req.Code(), r)
		}
	}
	if !c.do(ctrl.GetEstablished{}).(ctrl.EstablishedResponse).Bit {
		t.Fatal("HASH_END did not set the established bit")
	}
	if !contains(h.eng.Calls(), "HashData 4096") {
		t.Fatalf("HASH_DATA of 4096 bytes not passed whole: %q", h.eng.Calls())
	}
}

func TestGetInfoAndConfig(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	tests := []struct {
		name      string
		stateKey  []byte
		migKey    []byte
		wantFlags uint32
	}{
		{"no keys", nil, nil, 0},
		{"state key", key, nil, ctrl.ConfigFileKey},
		{"both keys", key, key[:16], ctrl.ConfigFileKey | ctrl.ConfigMigrationKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startServer(t, func(c *Config) { c.StateKey, c.MigrationKey = tt.stateKey, tt.migKey })
			c := h.dialCtrl()
			if got := c.do(ctrl.GetConfig{}).(ctrl.ConfigResponse).Flags; got != tt.wantFlags {
				t.Fatalf("GET_CONFIG flags %#x, want %#x", got, tt.wantFlags)
			}
			info := c.do(ctrl.GetInfo{Flags: 1}).(ctrl.InfoResponse)
			if int(info.TotLength) != len(info.Data) || info.Data[len(info.Data)-1] != 0 || !bytes.Contains(info.Data, []byte(`"family":"2.0"`)) {
				t.Fatalf("GET_INFO = %+v, want the NUL-terminated JSON, NUL counted", info)
			}
			part := c.do(ctrl.GetInfo{Flags: 1, Offset: 10}).(ctrl.InfoResponse)
			if !bytes.Equal(part.Data, info.Data[10:]) || part.TotLength != info.TotLength {
				t.Fatalf("GET_INFO at offset 10 = %q, want %q", part.Data, info.Data[10:])
			}
		})
	}
}

// GET_STATEBLOB from a running server, SET_STATEBLOB into a fresh stopped one, INIT:
// the TPM resumes with its NV contents and without Startup (QEMU's migration).
func TestStateBlobMigration(t *testing.T) {
	mkey := bytes.Repeat([]byte{0x42}, 32)
	skey := bytes.Repeat([]byte{0x17}, 32)
	tests := []struct {
		name       string
		src, dst   []byte // migration keys
		stateKey   []byte
		decrypted  bool
		wantResult ctrl.Result
	}{
		{"plain", nil, nil, nil, true, ctrl.ResSuccess},
		{"migration key", mkey, mkey, nil, true, ctrl.ResSuccess},
		{"state key layer without DECRYPTED", nil, nil, skey, false, ctrl.ResSuccess},
		{"migration key missing at destination", mkey, nil, nil, true, ctrl.ResKeyNotFound},
		{"wrong migration key", mkey, bytes.Repeat([]byte{1}, 32), nil, true, ctrl.ResDecryptError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := startServer(t, func(c *Config) { c.MigrationKey, c.StateKey = tt.src, tt.stateKey })
			sc := src.dialCtrl()
			sc.result(ctrl.Init{})
			_, sd := sc.setDataFD()
			tpmCall(t, sd, cmdStartupClear)
			tpmCall(t, sd, cmdNVWrite("bitlocker"))
			sc.result(ctrl.StoreVolatile{})
			if !src.store.has("volatilestate") {
				t.Fatal("STORE_VOLATILE wrote nothing")
			}
			flags := uint32(0)
			if tt.decrypted {
				flags = ctrl.StateFlagDecrypted
			}
			blobs := map[ctrl.BlobType]ctrl.StateBlobResponse{}
			for _, typ := range []ctrl.BlobType{ctrl.BlobPermanent, ctrl.BlobVolatile, ctrl.BlobSaveState} {
				blobs[typ] = sc.do(ctrl.GetStateBlob{Flags: flags, Type: typ}).(ctrl.StateBlobResponse)
			}
			if blobs[ctrl.BlobSaveState].Result != ctrl.ResRetry {
				t.Fatalf("savestate = %v, want 0x800 (absent)", blobs[ctrl.BlobSaveState].Result)
			}
			if src.store.has("volatilestate") {
				t.Fatal("GET_STATEBLOB(volatile) left the stored volatile state behind")
			}
			if bytes.Contains(blobs[ctrl.BlobPermanent].Data, []byte("bitlocker")) != (tt.src == nil && tt.stateKey == nil) {
				t.Fatalf("permanent blob plaintext visibility wrong for keys src=%v state=%v", tt.src != nil, tt.stateKey != nil)
			}
			if (blobs[ctrl.BlobPermanent].Flags&ctrl.StateFlagEncrypted != 0) != (tt.stateKey != nil && !tt.decrypted) {
				t.Fatalf("reply flags %#x", blobs[ctrl.BlobPermanent].Flags)
			}
			// An offset returns the tail, with totlength == length.
			tail := sc.do(ctrl.GetStateBlob{Flags: flags, Type: ctrl.BlobPermanent, Offset: 8}).(ctrl.StateBlobResponse)
			if tail.Result != 0 || len(tail.Data) != len(blobs[ctrl.BlobPermanent].Data)-8 {
				t.Fatalf("offset 8: %d bytes, want %d", len(tail.Data), len(blobs[ctrl.BlobPermanent].Data)-8)
			}

			dst := startServer(t, func(c *Config) { c.MigrationKey, c.StateKey = tt.dst, tt.stateKey })
			dc := dst.dialCtrl()
			dc.result(ctrl.Stop{})
			var got ctrl.Result
			for _, typ := range []ctrl.BlobType{ctrl.BlobPermanent, ctrl.BlobVolatile} {
				b := blobs[typ]
				if got = dc.result(ctrl.SetStateBlob{Flags: b.Flags, Type: typ, Data: b.Data}); got != ctrl.ResSuccess {
					break
				}
			}
			if got != tt.wantResult {
				t.Fatalf("SET_STATEBLOB = %v, want %v", got, tt.wantResult)
			}
			if got != ctrl.ResSuccess {
				return
			}
			if r := dc.result(ctrl.Init{Flags: ctrl.InitDeleteVolatile}); r != ctrl.ResSuccess {
				t.Fatalf("INIT = %v", r)
			}
			_, dd := dc.setDataFD()
			resp := tpmCall(t, dd, cmdNVRead)
			if rcOf(resp) != 0 || string(resp[10:]) != "bitlocker" {
				t.Fatalf("NV at the destination = %x, want %q without Startup", resp, "bitlocker")
			}
			stored, err := dst.store.Load("permall")
			if err != nil || !bytes.Contains(stored, []byte("bitlocker")) {
				t.Fatalf("destination store permall = %q, %v: the migrated state is not durable", stored, err)
			}
		})
	}
}

// An NV write is acknowledged only after the store took it; a store failure is never
// answered with success.
func TestNVWriteAckAfterStore(t *testing.T) {
	h := startServer(t, nil)
	c := h.dialCtrl()
	c.result(ctrl.Init{})
	_, dc := c.setDataFD()
	tpmCall(t, dc, cmdStartupClear)
	if rc := rcOf(tpmCall(t, dc, cmdNVWrite("one"))); rc != 0 {
		t.Fatalf("NV write rc %#x", rc)
	}
	if b, _ := h.store.Load("permall"); string(b) != "perm:one" {
		t.Fatalf("store after the acknowledged write = %q", b)
	}
	h.store.setFail(errors.New("disk full"))
	if rc := rcOf(tpmCall(t, dc, cmdNVWrite("two"))); rc == 0 {
		t.Fatal("NV write acknowledged although the store failed")
	}
}

func TestAutoShutdown(t *testing.T) {
	tests := []struct {
		name    string
		disable bool
		last    []byte // last TPM command before STOP
		want    int    // automatic Shutdown(STATE) commands seen
	}{
		{"after GetRandom", false, cmdGetRandom8, 1},
		{"after the guest's own Shutdown", false, cmdShutdownSt, 1}, // only the guest's
		{"disabled", true, cmdGetRandom8, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startServer(t, func(c *Config) { c.DisableAutoShutdown = tt.disable })
			c := h.dialCtrl()
			c.result(ctrl.Init{})
			_, dc := c.setDataFD()
			tpmCall(t, dc, cmdStartupClear)
			tpmCall(t, dc, tt.last)
			c.result(ctrl.Stop{})
			if got := count(h.eng.Calls(), "Shutdown 1"); got != tt.want {
				t.Fatalf("Shutdown(STATE) sent %d times, want %d: %q", got, tt.want, h.eng.Calls())
			}
			// After STOP the data channel answers with the fatal error, without the TPM.
			if resp := tpmCall(t, dc, cmdGetRandom8); !bytes.Equal(resp, data.NotRunningResponse()) {
				t.Fatalf("after STOP: %x", resp)
			}
		})
	}
}

// --terminate ends Serve when QEMU's data socket hangs up; --ctrl terminate when the
// control connection closes; otherwise both may come and go.
func TestTerminate(t *testing.T) {
	tests := []struct {
		name     string
		mod      func(*Config)
		closeCtl bool
		wantStop bool
	}{
		{"data fd hangs up with --terminate", func(c *Config) { c.Terminate = true }, false, true},
		{"control closes with ctrl terminate", func(c *Config) { c.CtrlTerminate = true }, true, true},
		{"data fd hangs up without --terminate", nil, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startServer(t, tt.mod)
			c := h.dialCtrl()
			_, dc := c.setDataFD()
			if tt.closeCtl {
				c.c.Close()
			} else {
				dc.Close()
			}
			if tt.wantStop {
				if err := h.waitDone(); err != nil {
					t.Fatal(err)
				}
				return
			}
			// Still serving: a new SET_DATAFD is accepted once the old one is gone.
			c2 := c
			if tt.closeCtl {
				c2 = h.dialCtrl()
			}
			deadline := time.Now().Add(ioTimeout)
			for {
				res, _ := c2.setDataFD()
				if res == ctrl.ResSuccess {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("SET_DATAFD after the hang-up = %v", res)
				}
				time.Sleep(10 * time.Millisecond) // polling the server's view, bounded
			}
		})
	}
}

func TestSetDataFDRefusedWithServer(t *testing.T) {
	dir := shortDir(t)
	l, err := net.Listen("unix", filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	h := startServer(t, func(c *Config) { c.DataListener = l })
	if res, _ := h.dialCtrl().setDataFD(); res != ctrl.ResIOError {
		t.Fatalf("SET_DATAFD with --server = %v, want IOERROR", res)
	}
}

// The data channel frames by the header: split commands, two commands in one write,
// the TPM_SEND_COMMAND prefix, and an oversized command (refused, then closed).
func TestDataFraming(t *testing.T) {
	dir := shortDir(t)
	l, err := net.Listen("unix", filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	h := startServer(t, func(c *Config) { c.DataListener = l; c.NotNeedInit = true; c.Startup = StartupClear })
	dc, err := net.Dial("unix", filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	dc.SetDeadline(time.Now().Add(ioTimeout))

	// Split after 3 bytes: one response.
	dc.Write(cmdGetRandom8[:3])
	if resp := tpmCall(t, dc, cmdGetRandom8[3:]); rcOf(resp) != 0 || len(resp) != 20 {
		t.Fatalf("split command: %x", resp)
	}
	// Two in one write: two responses.
	dc.Write(append(append([]byte{}, cmdGetRandom8...), cmdGetRandom8...))
	both := make([]byte, 40)
	if _, err := io.ReadFull(dc, both); err != nil || rcOf(both) != 0 || rcOf(both[20:]) != 0 {
		t.Fatalf("two commands in one write: %x, %v", both, err)
	}
	// Prefixed: `u32 size, resp, u32 0`, and the locality taken.
	pre := append([]byte{0, 0, 0, 8, 3, 0, 0, 0, byte(len(cmdGetRandom8))}, cmdGetRandom8...)
	dc.Write(pre)
	framed := make([]byte, 4+20+4)
	if _, err := io.ReadFull(dc, framed); err != nil || be32(framed) != 20 || be32(framed[24:]) != 0 || rcOf(framed[4:]) != 0 {
		t.Fatalf("prefixed reply = %x, %v", framed, err)
	}
	if !contains(h.eng.Calls(), "SetLocality 3") {
		t.Fatalf("prefix locality not applied: %q", h.eng.Calls())
	}
	// Oversized: TPM_RC_COMMAND_SIZE, then the connection closes.
	big := tpmCommand(0x17b, make([]byte, 5000))
	dc.Write(big[:10])
	resp := make([]byte, 10)
	if _, err := io.ReadFull(dc, resp); err != nil || rcOf(resp) != data.RCCommandSize {
		t.Fatalf("oversized: %x, %v", resp, err)
	}
	if _, err := dc.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the oversized command: %v, want EOF", err)
	}
}

func TestVendorSetLocality(t *testing.T) {
	tests := []struct {
		name   string
		allow  bool
		loc    byte
		wantRC uint32
	}{
		{"not allowed", false, 2, data.RCFailure},
		{"allowed", true, 2, 0},
		{"allowed, out of range", true, 5, data.RCLocality},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startServer(t, func(c *Config) { c.AllowSetLocality = tt.allow; c.NotNeedInit = true })
			_, dc := h.dialCtrl().setDataFD()
			if rc := rcOf(tpmCall(t, dc, tpmCommand(data.CCSetLocality, []byte{tt.loc}))); rc != tt.wantRC {
				t.Fatalf("rc %#x, want %#x", rc, tt.wantRC)
			}
		})
	}
}

// --server ...,disconnect closes the data connection after each response.
func TestDisconnect(t *testing.T) {
	dir := shortDir(t)
	l, err := net.Listen("unix", filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	startServer(t, func(c *Config) {
		c.DataListener = l
		c.Disconnect = true
		c.NotNeedInit = true
		c.Startup = StartupClear
	})
	for i := 0; i < 2; i++ {
		dc, err := net.Dial("unix", filepath.Join(dir, "data"))
		if err != nil {
			t.Fatal(err)
		}
		if rc := rcOf(tpmCall(t, dc, cmdGetRandom8)); rc != 0 {
			t.Fatalf("client %d: rc %#x", i, rc)
		}
		if _, err := dc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("client %d: %v, want EOF after the response", i, err)
		}
		dc.Close()
	}
}

// A second control client waits until the first is gone, as with swtpm.
func TestOneControlClientAtATime(t *testing.T) {
	h := startServer(t, nil)
	first := h.dialCtrl()
	first.result(ctrl.GetCapability{})
	second := h.dialCtrl()
	second.write(ctrl.GetCapability{}.Marshal())
	second.c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := second.c.Read(make([]byte, 8)); n != 0 || err == nil {
		t.Fatalf("second client answered (%d bytes, %v) while the first is connected", n, err)
	}
	first.c.Close()
	second.c.SetReadDeadline(time.Now().Add(ioTimeout))
	resp, err := ctrl.ReadResponse(second.c, ctrl.CmdGetCapability)
	if err != nil || resp.(ctrl.CapabilityResponse).Caps != ctrl.CapsTPM2Socket {
		t.Fatalf("second client after the first left: %v, %v", resp, err)
	}
}

// Cancelling the context stops Serve and saves the TPM with TPM2_Shutdown.
func TestContextCancelShutsDown(t *testing.T) {
	h := startServer(t, func(c *Config) { c.NotNeedInit = true; c.Startup = StartupClear })
	h.cancel()
	if err := h.waitDone(); err != nil {
		t.Fatal(err)
	}
	if !contains(h.eng.Calls(), "Shutdown 1") || !h.store.has("permall") {
		t.Fatalf("no TPM2_Shutdown(STATE) at cancel: %q", h.eng.Calls())
	}
}

// A stalled data peer does not block the control channel.
func TestStalledDataPeerDoesNotBlockControl(t *testing.T) {
	h := startServer(t, func(c *Config) { c.NotNeedInit = true; c.MessageTimeout = 100 * time.Millisecond })
	c := h.dialCtrl()
	_, dc := c.setDataFD()
	dc.Write(cmdGetRandom8[:5]) // and nothing more
	start := time.Now()
	if r := c.result(ctrl.GetEstablished{}); r != ctrl.ResSuccess {
		t.Fatalf("GET_TPMESTABLISHED = %v", r)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("control answered after %v while the data peer stalled", el)
	}
}

// When the TPM refuses a blob it drops those set before; INIT must then not store the
// earlier permanent blob over the directory's own state.
func TestRefusedBlobDropsHeldState(t *testing.T) {
	h := startServer(t, nil)
	h.store.Store("permall", []byte("perm:original"))
	c := h.dialCtrl()
	perm, _, err := envelope.ForMigration([]byte("perm:migrated"), nil, true)
	if err != nil {
		t.Fatal(err)
	}
	bad, _, _ := envelope.ForMigration([]byte("reject"), nil, true)
	if r := c.result(ctrl.SetStateBlob{Type: ctrl.BlobPermanent, Data: perm}); r != ctrl.ResSuccess {
		t.Fatalf("SET_STATEBLOB permanent = %v", r)
	}
	if r := c.result(ctrl.SetStateBlob{Type: ctrl.BlobVolatile, Data: bad}); r != ctrl.ResBadParameter {
		t.Fatalf("SET_STATEBLOB of a refused blob = %v, want the TPM's BAD_PARAMETER", r)
	}
	if r := c.result(ctrl.Init{}); r != ctrl.ResSuccess {
		t.Fatalf("INIT = %v", r)
	}
	if b, _ := h.store.Load("permall"); string(b) != "perm:original" {
		t.Fatalf("permall = %q after a refused migration, want the original", b)
	}
}

// With a one-shot control connection (clientfd=) and a one-shot data connection
// (--server fd=), Serve ends once both are gone: nothing could reach the TPM.
func TestOneShotConnectionsEndServe(t *testing.T) {
	ctrlPeer, ctrlConn := net.Pipe()
	dataPeer, dataConn := net.Pipe()
	h := startServer(t, func(c *Config) {
		c.CtrlListener, c.CtrlConn, c.DataConn = nil, ctrlConn, dataConn
		c.NotNeedInit, c.Startup = true, StartupClear
	})
	ctrlPeer.Close()
	// The data connection still works after the control connection is gone.
	if rc := rcOf(tpmCall(t, dataPeer, cmdGetRandom8)); rc != 0 {
		t.Fatalf("GetRandom after the control connection closed: rc %#x", rc)
	}
	select {
	case err := <-h.done:
		t.Fatalf("Serve returned (%v) while the data connection is open", err)
	default:
	}
	dataPeer.Close()
	if err := h.waitDone(); err != nil {
		t.Fatal(err)
	}
}

// Without a control channel (swtpm without --ctrl) and with a one-shot data connection
// (--server fd=), Serve ends once the data connection is gone.
func TestDataOnlyConnectionEndsServe(t *testing.T) {
	dataPeer, dataConn := net.Pipe()
	h := startServer(t, func(c *Config) {
		c.CtrlListener.Close()
		c.CtrlListener, c.DataConn = nil, dataConn
		c.NotNeedInit, c.Startup = true, StartupClear
	})
	if rc := rcOf(tpmCall(t, dataPeer, cmdGetRandom8)); rc != 0 {
		t.Fatalf("GetRandom on the data connection: rc %#x", rc)
	}
	dataPeer.Close()
	if err := h.waitDone(); err != nil {
		t.Fatal(err)
	}
}

// After the lock went to the migration destination, STOP sends no TPM2_Shutdown (it
// would save this TPM's state over the destination's); after LOCK_STORAGE it does again.
func TestNoAutoShutdownAfterLockReleased(t *testing.T) {
	ms := newMemStore()
	store := &lockingStore{memStore: ms}
	eng := newFakeEngine(ms)
	h := startServerWith(t, eng, store, func(c *Config) { c.ReleaseLockOutgoing = true })
	c := h.dialCtrl()
	c.result(ctrl.Init{})
	_, dc := c.setDataFD()
	tpmCall(t, dc, cmdStartupClear)
	c.do(ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: ctrl.BlobSaveState})
	store.mu.Lock()
	released := store.released
	store.mu.Unlock()
	if !released {
		t.Fatal("savestate GET did not release the lock")
	}
	c.result(ctrl.Stop{})
	if n := count(eng.Calls(), "Shutdown 1"); n != 0 {
		t.Fatalf("automatic Shutdown sent %d times with the lock released", n)
	}
	c.result(ctrl.LockStorage{Retries: 3})
	c.result(ctrl.Init{})
	tpmCall(t, dc, cmdStartupClear)
	c.result(ctrl.Stop{})
	if n := count(eng.Calls(), "Shutdown 1"); n != 1 {
		t.Fatalf("automatic Shutdown sent %d times after LOCK_STORAGE, want 1", n)
	}
}

// Control and data channels over TCP, as tpm2-tss' swtpm TCTI and swtpm_ioctl --tcp
// use them; one data client at a time.
func TestTCPChannels(t *testing.T) {
	cl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	startServer(t, func(c *Config) { c.CtrlListener, c.DataListener = cl, dl })
	cc, err := net.Dial("tcp", cl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cc.SetDeadline(time.Now().Add(ioTimeout))
	for _, req := range []ctrl.Request{ctrl.SetLocality{Loc: 0}, ctrl.Init{}} {
		cc.Write(req.Marshal())
		if r, err := ctrl.ReadResponse(cc, req.Code()); err != nil || r.(ctrl.ResultResponse).Result != ctrl.ResSuccess {
			t.Fatalf("%v over TCP: %v, %v", req.Code(), r, err)
		}
	}
	first, err := net.Dial("tcp", dl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if rc := rcOf(tpmCall(t, first, cmdStartupClear)); rc != 0 {
		t.Fatalf("Startup over TCP: rc %#x", rc)
	}
	second, err := net.Dial("tcp", dl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.Write(cmdGetRandom8)
	second.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := second.Read(make([]byte, 20)); n != 0 || err == nil {
		t.Fatalf("second data client answered (%d bytes, %v) while the first is connected", n, err)
	}
	first.Close()
	second.SetReadDeadline(time.Now().Add(ioTimeout))
	resp := make([]byte, 20)
	if _, err := io.ReadFull(second, resp); err != nil || rcOf(resp) != 0 {
		t.Fatalf("second data client after the first left: %x, %v", resp, err)
	}
}

// A TPM that cannot start at launch (--flags not-need-init) makes Serve fail with a
// clear error, and the listeners are closed.
func TestServeFailsWhenLaunchStartFails(t *testing.T) {
	store := newMemStore()
	store.Store("permall", []byte("corrupt"))
	h := startServerWith(t, newFakeEngine(store), store, func(c *Config) { c.NotNeedInit = true })
	err := h.waitDone()
	if err == nil || !strings.Contains(err.Error(), "not-need-init") || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("Serve = %v, want an error naming not-need-init and the cause", err)
	}
	if _, derr := net.Dial("unix", h.ctrlPath); derr == nil {
		t.Fatal("control socket still accepts after Serve failed")
	}
}

// gatedEngine is the fake engine with a MainInit that waits until release is closed.
type gatedEngine struct {
	*fakeEngine
	entered chan struct{} // closed when MainInit is entered
	release chan struct{}
}

func (g *gatedEngine) MainInit() error {
	close(g.entered)
	<-g.release
	return g.fakeEngine.MainInit()
}

// While the TPM starts at launch (--flags not-need-init), GET_CAPABILITY is answered
// at once, also to a client that connected and asked before Serve began; requests
// that need the TPM wait for the start, and Ready follows it.
func TestCapabilityAnsweredDuringLaunchStart(t *testing.T) {
	store := newMemStore()
	eng := &gatedEngine{fakeEngine: newFakeEngine(store), entered: make(chan struct{}), release: make(chan struct{})}
	dir := shortDir(t)
	path := filepath.Join(dir, "ctrl")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	// A client that is already waiting when Serve starts, as libvirt's is.
	early, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	if _, err := early.Write(ctrl.GetCapability{}.Marshal()); err != nil {
		t.Fatal(err)
	}
	srv, err := New(Config{Engine: eng, Store: store, Log: testLogger(t), CtrlListener: l, NotNeedInit: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return within 10 s of cancel")
		}
	}()
	defer func() {
		select {
		case <-eng.release:
		default:
			close(eng.release)
		}
	}()

	early.SetReadDeadline(time.Now().Add(ioTimeout))
	resp, err := ctrl.ReadResponse(early, ctrl.CmdGetCapability)
	if err != nil {
		t.Fatalf("GET_CAPABILITY of the client waiting at launch: %v", err)
	}
	if caps := resp.(ctrl.CapabilityResponse).Caps; caps != ctrl.CapsTPM2Socket {
		t.Fatalf("caps = %#x, want %#x", caps, ctrl.CapsTPM2Socket)
	}
	select {
	case <-eng.entered:
	case <-time.After(ioTimeout):
		t.Fatal("the TPM's start at launch did not begin")
	}
	// The start is still held: the next client (one at a time, as swtpm) is
	// answered too, and Ready waits.
	early.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(ctrl.GetCapability{}.Marshal()); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	if _, err := ctrl.ReadResponse(c, ctrl.CmdGetCapability); err != nil {
		t.Fatalf("GET_CAPABILITY during the start: %v", err)
	}
	select {
	case <-srv.Ready():
		t.Fatal("Ready before the TPM's start at launch finished")
	default:
	}
	close(eng.release)
	select {
	case <-srv.Ready():
	case <-time.After(ioTimeout):
		t.Fatal("not Ready after the TPM's start at launch finished")
	}
}
