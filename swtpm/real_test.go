package swtpm

import (
	"bytes"
	"context"
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
	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
	"github.com/nkp-dev/nkp/swtpm/state"
	"github.com/nkp-dev/nkp/test/e2e"
)

// The real engine and store satisfy the server's interfaces.
var (
	_ Engine        = (*libtpms.TPM)(nil)
	_ Store         = (*state.Dir)(nil)
	_ StorageLocker = (*state.Dir)(nil)
)

// realTPM opens libtpms over a state directory. libtpms has one TPM per process, so
// tests using it run one at a time (no t.Parallel) and close it at the end.
func realTPM(t *testing.T, dir string, key []byte) (*libtpms.TPM, *state.Dir) {
	t.Helper()
	var k *state.Key
	if key != nil {
		var err error
		if k, err = state.NewKey(key); err != nil {
			t.Fatal(err)
		}
		defer k.Wipe()
	}
	d, err := state.Open(dir, state.Options{Key: k, Mode: 0o600, Log: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := libtpms.Open(d)
	if err != nil {
		d.Close()
		if errors.Is(err, libtpms.ErrNoCgo) {
			e2e.Unavailable(t, "the real TPM engine needs cgo and libtpms-dev: "+err.Error())
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tpm.Close()
		d.Close()
	})
	return tpm, d
}

// closeReal stops a harness over a real TPM and releases libtpms for the next one.
func closeReal(t *testing.T, h *harness, tpm *libtpms.TPM, d *state.Dir) {
	t.Helper()
	h.cancel()
	if err := h.waitDone(); err != nil {
		t.Fatal(err)
	}
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// conn is a go-tpm transport over a data connection that reads responses by their
// header size (no reliance on one read returning a whole response).
type conn struct{ c net.Conn }

func (c conn) Send(cmd []byte) ([]byte, error) {
	c.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.c.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(c.c, hdr); err != nil {
		return nil, err
	}
	resp := make([]byte, binary.BigEndian.Uint32(hdr[2:]))
	copy(resp, hdr)
	_, err := io.ReadFull(c.c, resp[10:])
	return resp, err
}

var _ transport.TPM = conn{}

const nvIndex = tpm2.TPMHandle(0x01500017)

func nvDefineWrite(t *testing.T, tpm transport.TPM, value []byte) {
	t.Helper()
	def := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    nvIndex,
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTOrdinary, NoDA: true},
			DataSize:   uint16(len(value)),
		}),
	}
	if _, err := def.Execute(tpm); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: nvIndex}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_ReadPublic: %v", err)
	}
	w := tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: nvIndex, Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: value},
	}
	if _, err := w.Execute(tpm); err != nil {
		t.Fatalf("NV_Write: %v", err)
	}
}

func nvRead(t *testing.T, tpm transport.TPM, n int) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: nvIndex}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_ReadPublic: %v", err)
	}
	r, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: nvIndex, Name: pub.NVName},
		Size:       uint16(n),
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_Read: %v", err)
	}
	return r.Data.Buffer
}

func pcr16(t *testing.T, tpm transport.TPM) []byte {
	t.Helper()
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(16)},
	}}}.Execute(tpm)
	if err != nil || len(r.PCRValues.Digests) != 1 {
		t.Fatalf("PCR_Read: %v", err)
	}
	return r.PCRValues.Digests[0].Buffer
}

// initAndConnect sends INIT and SET_DATAFD and returns a go-tpm transport.
func initAndConnect(t *testing.T, c *ctrlClient, init bool) transport.TPM {
	t.Helper()
	if init {
		if r := c.result(ctrl.Init{}); r != ctrl.ResSuccess {
			t.Fatalf("INIT = %v", r)
		}
	}
	res, dc := c.setDataFD()
	if res != ctrl.ResSuccess {
		t.Fatalf("SET_DATAFD = %v", res)
	}
	return conn{dc}
}

// Startup, GetRandom, an NV write; restart over the same (encrypted) directory: the
// value is still there, and the files hold no plaintext of it.
func TestRealEngineRestartKeepsNV(t *testing.T) {
	dir := shortDir(t)
	key := bytes.Repeat([]byte{0x5a}, 32)
	value := []byte("nkp-nv-secret-42")

	eng, d := realTPM(t, dir, key)
	h := startServerWith(t, eng, d, func(c *Config) { c.StateKey = key })
	tpm := initAndConnect(t, h.dialCtrl(), true)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup: %v", err)
	}
	r, err := tpm2.GetRandom{BytesRequested: 16}.Execute(tpm)
	if err != nil || len(r.RandomBytes.Buffer) != 16 {
		t.Fatalf("GetRandom: %v", err)
	}
	nvDefineWrite(t, tpm, value)
	closeReal(t, h, eng, d)

	files, _ := filepath.Glob(filepath.Join(dir, "tpm2-00.*"))
	if len(files) == 0 {
		t.Fatal("no state files written")
	}
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if bytes.Contains(b, value) {
			t.Fatalf("%s holds the NV value in plaintext", f)
		}
	}

	eng2, d2 := realTPM(t, dir, key)
	h2 := startServerWith(t, eng2, d2, func(c *Config) { c.StateKey = key })
	tpm = initAndConnect(t, h2.dialCtrl(), true)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup after restart: %v", err)
	}
	if got := nvRead(t, tpm, len(value)); !bytes.Equal(got, value) {
		t.Fatalf("NV after restart = %q, want %q", got, value)
	}
	closeReal(t, h2, eng2, d2)
}

// A wrong key is a clear INIT failure and leaves the state files as they were.
func TestRealEngineWrongKey(t *testing.T) {
	dir := shortDir(t)
	key := bytes.Repeat([]byte{1}, 32)
	eng, d := realTPM(t, dir, key)
	h := startServerWith(t, eng, d, func(c *Config) { c.NotNeedInit = true; c.Startup = StartupClear })
	closeReal(t, h, eng, d) // auto-shutdown stores permall
	before, err := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	if err != nil {
		t.Fatal(err)
	}

	eng2, d2 := realTPM(t, dir, bytes.Repeat([]byte{2}, 32))
	h2 := startServerWith(t, eng2, d2, nil)
	if r := h2.dialCtrl().result(ctrl.Init{}); r == ctrl.ResSuccess {
		t.Fatal("INIT with a wrong key succeeded")
	}
	closeReal(t, h2, eng2, d2)
	after, err := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	if err != nil || !bytes.Equal(before, after) {
		t.Fatalf("state changed by a failed start with a wrong key (%v)", err)
	}
}

// GET_STATEBLOB from one server, SET_STATEBLOB into the next (another directory, in
// sequence since libtpms is one per process), INIT(DELETE_VOLATILE): NV and PCRs
// survive and the TPM resumes without Startup — QEMU's migration.
func TestRealEngineMigration(t *testing.T) {
	value := []byte("migrated")
	srcDir, dstDir := shortDir(t), shortDir(t)
	mkey := bytes.Repeat([]byte{0x33}, 32)

	eng, d := realTPM(t, srcDir, nil)
	src := startServerWith(t, eng, d, func(c *Config) { c.MigrationKey = mkey })
	sc := src.dialCtrl()
	tpm := initAndConnect(t, sc, true)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	nvDefineWrite(t, tpm, value)
	ext := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{9}, 32)}}},
	}
	if _, err := ext.Execute(tpm); err != nil {
		t.Fatal(err)
	}
	wantPCR := pcr16(t, tpm)
	blobs := map[ctrl.BlobType]ctrl.StateBlobResponse{}
	for _, typ := range []ctrl.BlobType{ctrl.BlobPermanent, ctrl.BlobVolatile, ctrl.BlobSaveState} {
		blobs[typ] = sc.do(ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: typ}).(ctrl.StateBlobResponse)
	}
	if blobs[ctrl.BlobPermanent].Result != 0 || blobs[ctrl.BlobVolatile].Result != 0 || blobs[ctrl.BlobSaveState].Result != ctrl.ResRetry {
		t.Fatalf("GET_STATEBLOB results %v %v %v, want 0 0 0x800", blobs[1].Result, blobs[2].Result, blobs[3].Result)
	}
	if bytes.Contains(blobs[ctrl.BlobPermanent].Data, value) {
		t.Fatal("migration blob with a migration key holds the NV value in plaintext")
	}
	closeReal(t, src, eng, d)

	eng2, d2 := realTPM(t, dstDir, nil)
	dst := startServerWith(t, eng2, d2, func(c *Config) { c.MigrationKey = mkey })
	dc := dst.dialCtrl()
	dc.result(ctrl.Stop{})
	for _, typ := range []ctrl.BlobType{ctrl.BlobPermanent, ctrl.BlobVolatile} {
		b := blobs[typ]
		if r := dc.result(ctrl.SetStateBlob{Flags: b.Flags, Type: typ, Data: b.Data}); r != ctrl.ResSuccess {
			t.Fatalf("SET_STATEBLOB %v = %v", typ, r)
		}
	}
	if r := dc.result(ctrl.Init{Flags: ctrl.InitDeleteVolatile}); r != ctrl.ResSuccess {
		t.Fatalf("INIT = %v", r)
	}
	tpm = initAndConnect(t, dc, false)
	if got := pcr16(t, tpm); !bytes.Equal(got, wantPCR) {
		t.Fatalf("PCR16 after migration = %x, want %x", got, wantPCR)
	}
	if got := nvRead(t, tpm, len(value)); !bytes.Equal(got, value) {
		t.Fatalf("NV after migration = %q", got)
	}
	closeReal(t, dst, eng2, d2)

	// A restart of the destination backend finds the migrated state on disk.
	eng3, d3 := realTPM(t, dstDir, nil)
	again := startServerWith(t, eng3, d3, nil)
	tpm = initAndConnect(t, again.dialCtrl(), true)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup after restarting the destination: %v", err)
	}
	if got := nvRead(t, tpm, len(value)); !bytes.Equal(got, value) {
		t.Fatalf("NV after restarting the destination = %q, want %q: the migrated state is not durable", got, value)
	}
	closeReal(t, again, eng3, d3)
}

// Padded and unpadded locality bodies, garbage and truncated messages against the real
// engine: right replies, and the channel stays in sync.
func TestRealEngineControlRobustness(t *testing.T) {
	eng, d := realTPM(t, shortDir(t), nil)
	h := startServerWith(t, eng, d, func(c *Config) { c.MessageTimeout = 100 * time.Millisecond })
	c := h.dialCtrl()
	tpm := initAndConnect(t, c, true)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name string
		send []byte
		want ctrl.Result
	}{
		{"SET_LOCALITY unpadded", ctrl.SetLocality{Loc: 3}.Marshal(), ctrl.ResSuccess},
		{"SET_LOCALITY padded", ctrl.SetLocality{Loc: 0, Padded: true}.Marshal(), ctrl.ResSuccess},
		{"RESET_TPMESTABLISHED padded loc 3", ctrl.ResetEstablished{Loc: 3, Padded: true}.Marshal(), ctrl.ResSuccess},
		{"RESET_TPMESTABLISHED loc 0", ctrl.ResetEstablished{Loc: 0}.Marshal(), ctrl.ResBadLocality},
		{"garbage", []byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3}, ctrl.ResBadOrdinal},
		{"INIT with a long body", []byte{0, 0, 0, 2, 0, 0, 0, 0, 0, 0}, ctrl.ResBadParameter},
	}
	for _, s := range steps {
		c.write(s.send)
		if got := ctrl.Result(be32(c.readN(4))); got != s.want {
			t.Fatalf("%s: %v, want %v", s.name, got, s.want)
		}
		if caps := c.do(ctrl.GetCapability{}).(ctrl.CapabilityResponse).Caps; caps != ctrl.CapsTPM2Socket {
			t.Fatalf("%s: out of sync afterwards", s.name)
		}
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Fatalf("GetRandom after the control errors: %v", err)
	}
	info := c.do(ctrl.GetInfo{Flags: 1}).(ctrl.InfoResponse)
	if !bytes.Contains(info.Data, []byte("TPMSpecification")) {
		t.Fatalf("GET_INFO = %q", info.Data)
	}
	closeReal(t, h, eng, d)
}

// BenchmarkRealEngine measures round trips through the server over a unix socketpair
// (SET_DATAFD, as QEMU connects), with an encrypted state directory:
// go test -run '^$' -bench RealEngine ./swtpm/
func BenchmarkRealEngine(b *testing.B) {
	dir, err := os.MkdirTemp("", "nkpbench")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	key, _ := state.NewKey(bytes.Repeat([]byte{7}, 32))
	d, err := state.Open(dir, state.Options{Key: key, Mode: 0o600})
	key.Wipe()
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	eng, err := libtpms.Open(d)
	if err != nil {
		b.Skip(err)
	}
	defer eng.Close()
	l, err := net.Listen("unix", filepath.Join(dir, "ctrl"))
	if err != nil {
		b.Fatal(err)
	}
	srv, err := New(Config{Engine: eng, Store: d, CtrlListener: l, NotNeedInit: true, Startup: StartupClear})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	defer func() { cancel(); <-done }()

	c, err := net.Dial("unix", filepath.Join(dir, "ctrl"))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	f := os.NewFile(uintptr(fds[0]), "bench")
	dc, _ := net.FileConn(f)
	f.Close()
	defer dc.Close()
	c.(*net.UnixConn).WriteMsgUnix(ctrl.SetDataFD{}.Marshal(), unix.UnixRights(fds[1]), nil)
	unix.Close(fds[1])
	if _, err := ctrl.ReadResponse(c, ctrl.CmdSetDataFD); err != nil {
		b.Fatal(err)
	}
	tpm := conn{dc}

	nvValue := []byte("12345678")
	def := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: nvIndex, NameAlg: tpm2.TPMAlgSHA256, DataSize: 8,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTOrdinary, NoDA: true},
		}),
	}
	if _, err := def.Execute(tpm); err != nil {
		b.Fatal(err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: nvIndex}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	benches := []struct {
		name string
		run  func() error
	}{
		{"GetRandom32", func() error { _, err := tpm2.GetRandom{BytesRequested: 32}.Execute(tpm); return err }},
		{"PCRExtend", func() error {
			_, err := tpm2.PCRExtend{
				PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
				Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}},
			}.Execute(tpm)
			return err
		}},
		{"NVWriteEncryptedState", func() error {
			// New data every call: libtpms stores nothing when NV does not change.
			binary.BigEndian.PutUint64(nvValue, binary.BigEndian.Uint64(nvValue)+1)
			_, err := tpm2.NVWrite{
				AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
				NVIndex:    tpm2.NamedHandle{Handle: nvIndex, Name: pub.NVName},
				Data:       tpm2.TPM2BMaxNVBuffer{Buffer: nvValue},
			}.Execute(tpm)
			return err
		}},
		{"CreatePrimaryECC", func() error {
			r, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tpm)
			if err != nil {
				return err
			}
			_, err = tpm2.FlushContext{FlushHandle: r.ObjectHandle}.Execute(tpm)
			return err
		}},
	}
	for _, bb := range benches {
		b.Run(bb.name, func(b *testing.B) {
			before := cpuTime()
			for b.Loop() {
				if err := bb.run(); err != nil {
					b.Fatal(err)
				}
			}
			// CPU time of the whole process (client and server) per call: steadier than
			// wall time on a loaded machine.
			b.ReportMetric(float64(cpuTime()-before)/float64(b.N), "cpu-ns/op")
		})
	}
}

// cpuTime returns the process' user+system CPU time.
func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// --migration release-lock-outgoing: reading the savestate blob (QEMU's last
// GET_STATEBLOB) releases the directory lock for the destination; LOCK_STORAGE (QEMU's
// fallback when the migration failed) takes it back.
func TestRealEngineReleaseLockOutgoing(t *testing.T) {
	dir := shortDir(t)
	eng, d := realTPM(t, dir, nil)
	h := startServerWith(t, eng, d, func(c *Config) {
		c.ReleaseLockOutgoing, c.NotNeedInit, c.Startup = true, true, StartupClear
	})
	c := h.dialCtrl()
	locked := func() bool {
		other, err := state.Open(dir, state.Options{})
		if err == nil {
			other.Close()
			return false
		}
		if !errors.Is(err, state.ErrLocked) {
			t.Fatalf("state.Open: %v", err)
		}
		return true
	}
	if !locked() {
		t.Fatal("the state directory is not locked while served")
	}
	if r := c.do(ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: ctrl.BlobPermanent}).(ctrl.StateBlobResponse); r.Result != 0 || !locked() {
		t.Fatalf("GET_STATEBLOB permanent: %v; the lock must stay until the savestate blob", r.Result)
	}
	if r := c.do(ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: ctrl.BlobSaveState}).(ctrl.StateBlobResponse); r.Result != ctrl.ResRetry {
		t.Fatalf("GET_STATEBLOB savestate = %v", r.Result)
	}
	if locked() {
		t.Fatal("the lock is still held after the savestate blob was read")
	}
	if r := c.result(ctrl.LockStorage{Retries: 10}); r != ctrl.ResSuccess {
		t.Fatalf("LOCK_STORAGE = %v", r)
	}
	if !locked() {
		t.Fatal("LOCK_STORAGE did not take the lock back")
	}
	closeReal(t, h, eng, d)
}

// At launch (--flags not-need-init,startup-clear) a data client that connected and
// sent a command before Serve began is served by the engine's data loop only after
// the TPM started: its first command succeeds instead of meeting a TPM that does not
// run yet.
func TestRealEngineDataWaitsForLaunchStart(t *testing.T) {
	dir := shortDir(t)
	tpm, d := realTPM(t, t.TempDir(), nil)
	dataPath := filepath.Join(dir, "data")
	dl, err := net.Listen("unix", dataPath)
	if err != nil {
		t.Fatal(err)
	}
	early, err := net.Dial("unix", dataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	cmd := commandOf(t, tpm2.GetRandom{BytesRequested: 8})
	if _, err := early.Write(cmd); err != nil {
		t.Fatal(err)
	}
	h := startServerWith(t, tpm, d, func(c *Config) {
		c.DataListener = dl
		c.NotNeedInit, c.Startup = true, StartupClear
	})
	early.SetReadDeadline(time.Now().Add(30 * time.Second))
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(early, hdr); err != nil {
		t.Fatalf("response to the command sent at launch: %v", err)
	}
	if rc := binary.BigEndian.Uint32(hdr[6:]); rc != 0 {
		t.Fatalf("GetRandom sent at launch answered with TPM rc %#x, want success after the start", rc)
	}
	closeReal(t, h, tpm, d)
}

// commandOf returns the bytes go-tpm sends for cmd.
func commandOf(t *testing.T, cmd interface {
	Execute(transport.TPM, ...tpm2.Session) (*tpm2.GetRandomResponse, error)
}) []byte {
	t.Helper()
	var rec recorder
	cmd.Execute(&rec)
	if rec.cmd == nil {
		t.Fatal("go-tpm sent no command")
	}
	return rec.cmd
}

// recorder is a transport that keeps the command and answers nothing.
type recorder struct{ cmd []byte }

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.cmd = append([]byte{}, cmd...)
	return nil, errors.New("recorded")
}

// Without a control channel (swtpm socket without --ctrl) the TPM is served on the data
// channel alone, as swtpm serves it: started at launch it answers; not started, nothing
// can INIT it and every command gets TPM_RC_FAILURE, swtpm's answer.
func TestRealEngineDataOnly(t *testing.T) {
	tests := []struct {
		name        string
		notNeedInit bool
		wantRC      uint32
	}{
		{"started at launch", true, 0},
		{"not started", false, 0x101},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dataPath := filepath.Join(shortDir(t), "data")
			dl, err := net.Listen("unix", dataPath)
			if err != nil {
				t.Fatal(err)
			}
			tpm, d := realTPM(t, t.TempDir(), nil)
			h := startServerWith(t, tpm, d, func(c *Config) {
				c.CtrlListener.Close()
				c.CtrlListener = nil
				c.DataListener = dl
				if tt.notNeedInit {
					c.NotNeedInit, c.Startup = true, StartupClear
				}
			})
			c, err := net.Dial("unix", dataPath)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if rc := rcOf(tpmCall(t, c, commandOf(t, tpm2.GetRandom{BytesRequested: 8}))); rc != tt.wantRC {
				t.Fatalf("GetRandom answered TPM rc %#x, want %#x", rc, tt.wantRC)
			}
			c.Close()
			closeReal(t, h, tpm, d)
		})
	}
}
