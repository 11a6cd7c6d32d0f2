package vtpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/test/e2e"
)

var (
	buildOnce sync.Once
	swtpmBin  string
	buildErr  error
)

// nkpSwtpm builds cmd/nkp-swtpm once into a directory the vTPM user can read.
func nkpSwtpm(t *testing.T) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root (runs nkp-swtpm as another user)")
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nkp-vtpm-bin-")
		if err != nil {
			buildErr = err
			return
		}
		os.Chmod(dir, 0o755)
		swtpmBin = filepath.Join(dir, "nkp-swtpm")
		out, err := exec.Command("go", "build", "-o", swtpmBin, "github.com/nkp-dev/nkp/cmd/nkp-swtpm").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("build nkp-swtpm: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return swtpmBin
}

func lookup(t *testing.T, name string) Credential {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Skipf("user %s: %v", name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return Credential{uid, gid}
}

// dirs returns a state root and a run dir under a temporary directory others may
// traverse (t.TempDir is 0700).
func dirs(t *testing.T) (string, string) {
	base := e2e.TraversableDir(t, "nkp-vtpm-test-")
	return filepath.Join(base, "state"), filepath.Join(base, "run")
}

func newSupervisor(t *testing.T, state, run string) *Supervisor {
	t.Helper()
	s, err := New(Config{
		Binary: nkpSwtpm(t), StateRoot: state, RunDir: run,
		User: lookup(t, "tss"), QEMU: lookup(t, "libvirt-qemu"),
		StopTimeout: 3 * time.Second,
		Log:         slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func key(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// keys is a vTPM's state key filled with b and a migration key derived from it.
func keys(state []byte) Keys { return Keys{State: state, Migration: bytes.Repeat([]byte{0x5c}, 32)} }

// session is a QEMU-like client of a vTPM control socket: SET_DATAFD, INIT, TPM commands.
type session struct {
	ctrl *net.UnixConn
	data *os.File
}

func dial(t *testing.T, sock string) *session {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatalf("connect %s: %v", sock, err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "data"), os.NewFile(uintptr(fds[1]), "data-peer")
	defer theirs.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, _, err := c.WriteMsgUnix(ctrl.SetDataFD{}.Marshal(), unix.UnixRights(int(theirs.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	s := &session{ctrl: c, data: mine}
	if rc := s.result(t); rc != 0 {
		t.Fatalf("SET_DATAFD: result %#x", rc)
	}
	t.Cleanup(func() { c.Close(); mine.Close() })
	return s
}

func (s *session) result(t *testing.T) uint32 {
	var b [4]byte
	if _, err := s.ctrl.Read(b[:]); err != nil {
		t.Fatalf("control response: %v", err)
	}
	return binary.BigEndian.Uint32(b[:])
}

func (s *session) init(t *testing.T) uint32 {
	if _, err := s.ctrl.Write(ctrl.Init{}.Marshal()); err != nil {
		t.Fatal(err)
	}
	return s.result(t)
}

func (s *session) tpm(t *testing.T, cmdHex string) []byte {
	t.Helper()
	cmd, _ := hex.DecodeString(cmdHex)
	s.data.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := s.data.Write(cmd); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	n, err := s.data.Read(buf)
	if err != nil {
		t.Fatalf("TPM response: %v", err)
	}
	return buf[:n]
}

// stateBlobHeader asks for one state blob as QEMU does before a migration or a save
// (decrypted flag set) and returns its swtpm envelope header.
func (s *session) stateBlobHeader(t *testing.T, typ ctrl.BlobType) envelope.Header {
	t.Helper()
	if _, err := s.ctrl.Write(ctrl.GetStateBlob{Flags: ctrl.StateFlagDecrypted, Type: typ}.Marshal()); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	n, err := io.ReadAtLeast(s.ctrl, buf, 16)
	if err != nil {
		t.Fatalf("GET_STATEBLOB: %v", err)
	}
	if r := binary.BigEndian.Uint32(buf); r != 0 {
		t.Fatalf("GET_STATEBLOB: result %#x", r)
	}
	length := int(binary.BigEndian.Uint32(buf[12:]))
	for n < 16+length {
		m, err := s.ctrl.Read(buf[n:])
		if err != nil {
			t.Fatalf("GET_STATEBLOB data: %v", err)
		}
		n += m
	}
	h, _, err := envelope.ParseHeader(buf[16 : 16+length])
	if err != nil {
		t.Fatalf("GET_STATEBLOB blob: %v", err)
	}
	return h
}

func rc(rsp []byte) uint32 {
	if len(rsp) < 10 {
		return 0xffffffff
	}
	return binary.BigEndian.Uint32(rsp[6:10])
}

const (
	startupClear = "80010000000c000001440000"
	getRandom8   = "80010000000c0000017b0008"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, bounded by deadline
	}
}

func TestStartServeStop(t *testing.T) {
	state, run := dirs(t)
	s := newSupervisor(t, state, run)
	ctx := context.Background()
	vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-a", KeyID: kdk.NewKeyID(), KDKVersion: 1}
	k := key(0xa5)
	inst, err := s.Start(ctx, vm, keys(k))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(ctx, vm, keys(k)); !errors.Is(err, ErrRunning) {
		t.Errorf("second Start: %v, want ErrRunning", err)
	}

	// Who and what: the vTPM user, its own session, socket for QEMU's user only.
	tss, qemu := lookup(t, "tss"), lookup(t, "libvirt-qemu")
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", inst.PID))
	if !strings.Contains(string(status), fmt.Sprintf("\nUid:\t%d\t%d\t%d\t%d\n", tss.UID, tss.UID, tss.UID, tss.UID)) {
		t.Errorf("nkp-swtpm does not run as tss:\n%s", status)
	}
	if groups := fieldOf(string(status), "Groups:"); groups != "" {
		t.Errorf("nkp-swtpm has supplementary groups:\n%s", status)
	}
	if sid, _ := unix.Getsid(inst.PID); sid != inst.PID {
		t.Errorf("nkp-swtpm session %d, want its own (%d)", sid, inst.PID)
	}
	fi, err := os.Stat(inst.Socket)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 || int(st.Uid) != qemu.UID {
		t.Errorf("socket %s: mode %v owner %d, want socket 0600 owned by libvirt-qemu (%d)", inst.Socket, fi.Mode(), st.Uid, qemu.UID)
	}
	fi, _ = os.Stat(inst.StateDir)
	st = fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o700 || int(st.Uid) != tss.UID {
		t.Errorf("state dir: mode %v owner %d, want 0700 owned by tss", fi.Mode(), st.Uid)
	}
	// No key material where others can read it.
	for _, f := range []string{"cmdline", "environ"} {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/%s", inst.PID, f))
		if bytes.Contains(b, k) || bytes.Contains(bytes.ToLower(b), []byte(hex.EncodeToString(k))) || bytes.Contains(b, []byte("file=")) {
			t.Errorf("/proc/%d/%s holds the key or a key file: %q", inst.PID, f, b)
		}
	}

	// The status channel: root's only, and before QEMU's INIT it answers that the TPM
	// is not started.
	fi, err = os.Stat(s.statusPath(vm.UUID))
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("status socket: %v %v, want a socket 0600 owned by root", fi, err)
	}
	if err := s.Probe(ctx, vm.UUID); err == nil || !strings.Contains(err.Error(), "reports") {
		t.Errorf("Probe before INIT: %v, want the TPM's refusal", err)
	}

	// A QEMU-like session works, and the state it writes is encrypted.
	sess := dial(t, inst.Socket)
	if r := sess.init(t); r != 0 {
		t.Fatalf("INIT: %#x", r)
	}
	// While QEMU holds the control channel, the vTPM answers on its status channel.
	if err := s.Probe(ctx, vm.UUID); err != nil {
		t.Errorf("Probe of a running vTPM: %v", err)
	}
	if r := rc(sess.tpm(t, startupClear)); r != 0 {
		t.Fatalf("Startup: %#x", r)
	}
	if r := rc(sess.tpm(t, getRandom8)); r != 0 {
		t.Fatalf("GetRandom: %#x", r)
	}
	perm, err := os.ReadFile(filepath.Join(inst.StateDir, "tpm2-00.permall"))
	if err != nil || !bytes.HasPrefix(perm, []byte("NKPSTATE")) {
		t.Fatalf("state file: %v, header %q; want nkp's encrypted format", err, perm[:min(8, len(perm))])
	}
	// What QEMU takes out for a migration or `virsh save` (GET_STATEBLOB with the state
	// key's layer removed, as QEMU asks) is under the migration key, never plaintext.
	if h := sess.stateBlobHeader(t, ctrl.BlobPermanent); h.Flags&envelope.FlagMigrationEncrypted == 0 {
		t.Errorf("GET_STATEBLOB gives a blob with flags %#x: not encrypted under the migration key", h.Flags)
	}

	if err := s.Stop(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(inst.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after Stop: %v", err)
	}
	if err := s.Probe(ctx, vm.UUID); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Probe after Stop: %v, want ErrNotRunning", err)
	}
	if _, err := os.Stat(s.statusPath(vm.UUID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("status socket left after Stop: %v", err)
	}
	if _, err := os.Stat(s.recordPath(vm.UUID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record left after Stop: %v", err)
	}
	if ok, _ := sameProcess(inst); ok {
		t.Error("process still running after Stop")
	}
	if err := s.Stop(ctx, vm.UUID); !errors.Is(err, ErrNotRunning) {
		t.Errorf("second Stop: %v, want ErrNotRunning", err)
	}

	// Same key again: the state decrypts (INIT 0). Wrong key: INIT fails, state untouched.
	for _, tc := range []struct {
		key  []byte
		good bool
	}{{key(0xa5), true}, {key(0x5a), false}} {
		inst, err := s.Start(ctx, vm, keys(tc.key))
		if err != nil {
			t.Fatal(err)
		}
		r := dial(t, inst.Socket).init(t)
		if (r == 0) != tc.good {
			t.Errorf("INIT with the %v key: %#x", map[bool]string{true: "right", false: "wrong"}[tc.good], r)
		}
		if err := s.Stop(ctx, vm.UUID); err != nil {
			t.Fatal(err)
		}
	}
	after, _ := os.ReadFile(filepath.Join(inst.StateDir, "tpm2-00.permall"))
	if len(after) == 0 {
		t.Error("state file gone after a wrong-key start")
	}
}

// QEMU's SHUTDOWN ends nkp-swtpm; the supervisor reports it on Exits and cleans up.
func TestExitReported(t *testing.T) {
	state, run := dirs(t)
	s := newSupervisor(t, state, run)
	vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-exit", KeyID: kdk.NewKeyID()}
	inst, err := s.Start(context.Background(), vm, keys(key(1)))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("swtpm_ioctl", "--unix", inst.Socket, "-s").CombinedOutput(); err != nil {
		t.Fatalf("swtpm_ioctl -s: %v %s", err, out)
	}
	select {
	case got := <-s.Exits():
		if got != vm.UUID {
			t.Errorf("Exits: %s, want %s", got, vm.UUID)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no exit reported within 15 s")
	}
	if _, ok := s.Get(vm.UUID); ok {
		t.Error("Get still finds the ended vTPM")
	}
	if _, err := os.Stat(inst.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left: %v", err)
	}
}

func TestStartFails(t *testing.T) {
	state, run := dirs(t)
	s := newSupervisor(t, state, run)
	ctx := context.Background()
	if _, err := s.Start(ctx, VM{UUID: "NOT-A-UUID", Name: "x"}, keys(key(1))); err == nil {
		t.Error("Start accepted a bad UUID")
	}
	if _, err := s.Start(ctx, VM{UUID: kdk.NewKeyID(), Name: "x"}, keys(key(1)[:16])); err == nil {
		t.Error("Start accepted a 16-byte key")
	}
	// A state directory nkp-swtpm cannot use: a file in its place.
	vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-bad", KeyID: kdk.NewKeyID()}
	os.MkdirAll(filepath.Join(state, vm.UUID), 0o711)
	os.WriteFile(filepath.Join(state, vm.UUID, vm.KeyID), []byte("x"), 0o600)
	if _, err := s.Start(ctx, vm, keys(key(1))); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("Start over a file: %v", err)
	}
	// A binary that exits at once: the error carries its log.
	s.cfg.Binary = "/bin/false"
	if _, err := s.Start(ctx, VM{UUID: kdk.NewKeyID(), Name: "x"}, keys(key(1))); err == nil {
		t.Error("Start accepted a VM without a key ID")
	}
	vm2 := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-false", KeyID: kdk.NewKeyID()}
	if _, err := s.Start(ctx, vm2, keys(key(1))); !errors.Is(err, ErrStart) || !strings.Contains(err.Error(), "exited") {
		t.Errorf("Start of /bin/false: %v", err)
	}
	if _, ok := s.Get(vm2.UUID); ok {
		t.Error("a failed start left an instance")
	}
	// A vTPM that reports why it cannot serve on its readiness pipe and lingers: Start
	// fails at once with that reason, without waiting for the timeout.
	f, err := os.CreateTemp("", "nkp-vtpm-fails-*.sh") // the vTPM user must reach it
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	script := f.Name()
	t.Cleanup(func() { os.Remove(script) })
	os.WriteFile(script, []byte("#!/bin/sh\necho \"ERROR state directory locked by another vTPM\" >&5\nexec 5>&-\nexec sleep 30\n"), 0o755)
	os.Chmod(script, 0o755)
	s.cfg.Binary, s.cfg.StartTimeout = script, 20*time.Second
	t0 := time.Now()
	_, err = s.Start(ctx, VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-error", KeyID: kdk.NewKeyID()}, keys(key(1)))
	if !errors.Is(err, ErrStart) || !strings.Contains(err.Error(), "state directory locked by another vTPM") {
		t.Errorf("Start of a vTPM that reports an error: %v", err)
	}
	if took := time.Since(t0); took > 10*time.Second {
		t.Errorf("Start took %v to see the reported error", took)
	}
	if _, err := os.Stat(s.SocketPath(vm2.UUID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed start left its socket: %v", err)
	}
}

// TestKill9Adopt: a hostd (a helper process) starts a vTPM and is killed with SIGKILL; the
// vTPM keeps serving; a new supervisor adopts it, sees its end, and Stop works on it.
func TestKill9Adopt(t *testing.T) {
	if os.Getenv("NKP_VTPM_HELPER") != "" {
		t.Skip("helper")
	}
	state, run := dirs(t)
	nkpSwtpm(t)
	// Orphans come to this test process, which reaps them (PID 1 here does not).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-kill9", KeyID: kdk.NewKeyID(), KDKVersion: 2}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperHostd$")
	cmd.Env = append(os.Environ(), "NKP_VTPM_HELPER=1", "H_STATE="+state, "H_RUN="+run, "H_BIN="+swtpmBin, "H_VM="+vm.UUID, "H_KEYID="+vm.KeyID)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rec := filepath.Join(run, vm.UUID+".json")
	waitFor(t, "the helper's vTPM record", func() bool { _, err := os.Stat(rec); return err == nil })
	cmd.Process.Kill()
	cmd.Wait()

	s := newSupervisor(t, state, run)
	adopted, err := s.Adopt()
	if err != nil || len(adopted) != 1 || adopted[0].UUID != vm.UUID || adopted[0].KDKVersion != 2 {
		t.Fatalf("Adopt = %+v, %v; helper said:\n%s", adopted, err, out.String())
	}
	inst := adopted[0]
	// Still serving after its hostd died.
	sess := dial(t, inst.Socket)
	if r := sess.init(t); r != 0 {
		t.Fatalf("INIT on the adopted vTPM: %#x", r)
	}
	if r := rc(sess.tpm(t, startupClear)); r != 0 {
		t.Fatalf("Startup on the adopted vTPM: %#x", r)
	}
	sess.ctrl.Close()
	sess.data.Close()
	// --terminate: losing QEMU's connection ends it; the new supervisor notices (the
	// process is our zombie child now: reap it after the pidfd reported the end).
	select {
	case got := <-s.Exits():
		if got != vm.UUID {
			t.Errorf("Exits: %s", got)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("end of the adopted vTPM not reported")
	}
	var ws unix.WaitStatus
	unix.Wait4(inst.PID, &ws, unix.WNOHANG, nil)
	if _, err := os.Stat(rec); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record of the ended vTPM left: %v", err)
	}

	// Adopt twice more: a record naming a recycled pid or a dead process is cleaned up.
	bogus := Instance{VM: VM{UUID: kdk.NewKeyID()}, PID: os.Getpid(), StartTicks: 1, StateDir: state + "/x", Socket: run + "/x.sock"}
	b, _ := json.Marshal(bogus)
	os.WriteFile(filepath.Join(run, bogus.UUID+".json"), b, 0o600)
	os.WriteFile(filepath.Join(run, kdk.NewKeyID()+".json"), []byte("{garbage"), 0o600)
	if got, err := newSupervisor(t, state, run).Adopt(); err != nil || len(got) != 0 {
		t.Errorf("Adopt of stale records = %+v, %v", got, err)
	}
	if ents, _ := os.ReadDir(run); len(ents) != 0 {
		t.Errorf("stale records left: %v", ents)
	}
}

// TestHelperHostd is the helper process of TestKill9Adopt: it starts one vTPM and waits
// to be killed.
func TestHelperHostd(t *testing.T) {
	if os.Getenv("NKP_VTPM_HELPER") == "" {
		t.Skip("helper of TestKill9Adopt and TestCrashLaunch")
	}
	tss, qemu := lookup(t, "tss"), lookup(t, "libvirt-qemu")
	crashAt := os.Getenv("H_CRASH_STEP") // TestCrashLaunch: SIGKILL right after that step
	s, err := New(Config{Binary: os.Getenv("H_BIN"), StateRoot: os.Getenv("H_STATE"), RunDir: os.Getenv("H_RUN"), User: tss, QEMU: qemu,
		AfterStep: func(step string) {
			if step == crashAt {
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(context.Background(), VM{UUID: os.Getenv("H_VM"), Name: "vtpm-test-kill9", KeyID: os.Getenv("H_KEYID"), KDKVersion: 2}, keys(key(7))); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Minute) // killed by the parent test long before
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		in    string
		state byte
		ticks uint64
		ok    bool
	}{
		{"123 (nkp-swtpm) S 1 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 98765 1 2 3", 'S', 98765, true},
		{"5 (a) b) c) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 x", 'Z', 4242, true},
		{"garbage", 0, 0, false},
		{"1 (x) S 1 2", 0, 0, false},
	}
	for _, tt := range tests {
		st, ticks, err := parseStat([]byte(tt.in))
		if (err == nil) != tt.ok || st != tt.state || ticks != tt.ticks {
			t.Errorf("parseStat(%q) = %c %d %v", tt.in, st, ticks, err)
		}
	}
}

func fieldOf(status, name string) string {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, name); ok {
			return strings.TrimSpace(v)
		}
	}
	return "(missing)"
}

// TestTail: what a failed start quotes from the vTPM's log (written by the unprivileged
// vTPM, shown to the virsh user through the hook's reply) is valid UTF-8 without control
// characters, only what was written since the offset, and at most the last 5 lines.
func TestTail(t *testing.T) {
	tests := []struct {
		name, before, log, want string
	}{
		{"plain", "old line\n", "a\nb\n", "a | b"},
		{"last five", "", "1\n2\n3\n4\n5\n6\n7\n", "3 | 4 | 5 | 6 | 7"},
		{"invalid UTF-8", "", "bad \xff\xfe key\n", "bad ? key"},
		{"terminal escapes", "", "x\x1b[2J\x1b]0;owned\x07y\r\u009bz\n", "x?[2J?]0;owned?y??z"},
		{"nothing new", "old\n", "", "(nothing)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "vm.log")
			if err := os.WriteFile(p, []byte(tt.before+tt.log), 0o600); err != nil {
				t.Fatal(err)
			}
			got := tail(p, int64(len(tt.before)))
			if got != tt.want {
				t.Errorf("tail = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestLaunchWait: Launch returns before the vTPM serves (the prepare hook), Wait returns
// once it does (the start hook), a failed launch's reason stays for Wait, and Stop waits
// for a launch in progress.
func TestLaunchWait(t *testing.T) {
	state, run := dirs(t)
	s := newSupervisor(t, state, run)
	ctx := context.Background()
	script := func(body string) string {
		f, err := os.CreateTemp("", "nkp-vtpm-launch-*.sh") // the vTPM user must reach it
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		t.Cleanup(func() { os.Remove(f.Name()) })
		os.WriteFile(f.Name(), []byte("#!/bin/sh\n"+body), 0o755)
		os.Chmod(f.Name(), 0o755)
		return f.Name()
	}
	s.cfg.Binary = script("sleep 0.7\necho READY >&5\nexec 5>&-\nexec sleep 30\n")
	vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-launch", KeyID: kdk.NewKeyID()}
	t0 := time.Now()
	if err := s.Launch(vm, keys(key(3))); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took > 500*time.Millisecond {
		t.Errorf("Launch took %v: it waited for the vTPM", took)
	}
	if _, ok := s.Get(vm.UUID); ok {
		t.Error("Get reports a vTPM that does not serve yet")
	}
	if err := s.Launch(vm, keys(key(3))); !errors.Is(err, ErrRunning) {
		t.Errorf("second Launch while the first starts: %v, want ErrRunning", err)
	}
	inst, err := s.Wait(ctx, vm.UUID)
	if err != nil || inst.PID == 0 || time.Since(t0) < 700*time.Millisecond {
		t.Fatalf("Wait = %+v, %v after %v; want the instance once it reported READY", inst, err, time.Since(t0))
	}
	if got, ok := s.Get(vm.UUID); !ok || got.PID != inst.PID {
		t.Errorf("Get after Wait = %+v %v", got, ok)
	}
	if err := s.Stop(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}

	// Stop during a launch waits for it, then stops it.
	if err := s.Launch(vm, keys(key(3))); err != nil {
		t.Fatal(err)
	}
	if err := s.Stop(ctx, vm.UUID); err != nil {
		t.Errorf("Stop during a launch: %v", err)
	}
	if _, err := s.Wait(ctx, vm.UUID); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Wait after Stop: %v, want ErrNotRunning", err)
	}

	// A launch that fails: Wait gives the reason, again on a later Wait.
	s.cfg.Binary = script("echo \"ERROR the TPM state cannot be read\" >&5\nexit 1\n")
	if err := s.Launch(vm, keys(key(3))); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := s.Wait(ctx, vm.UUID); !errors.Is(err, ErrStart) || !strings.Contains(err.Error(), "the TPM state cannot be read") {
			t.Errorf("Wait after a failed launch: %v", err)
		}
	}
}

// TestLaunchesAtOnce: launches of many VMs at once take their spawn sections one at a
// time (so they do not crowd out the goroutines that answer hooks) while their readiness
// waits overlap.
func TestLaunchesAtOnce(t *testing.T) {
	state, run := dirs(t)
	s := newSupervisor(t, state, run)
	var (
		mu           sync.Mutex
		inside, most int
	)
	s.cfg.AfterStep = func(step string) {
		mu.Lock()
		defer mu.Unlock()
		switch step {
		case "intent":
			inside++
			most = max(most, inside)
		case "recorded":
			inside--
		}
	}
	f, err := os.CreateTemp("", "nkp-vtpm-launch-*.sh") // the vTPM user must reach it
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Cleanup(func() { os.Remove(f.Name()) })
	const ready = 600 * time.Millisecond
	os.WriteFile(f.Name(), []byte("#!/bin/sh\nsleep 0.6\necho READY >&5\nexec 5>&-\nexec sleep 30\n"), 0o755)
	os.Chmod(f.Name(), 0o755)
	s.cfg.Binary = f.Name()
	const n = 6
	vms := make([]VM, n)
	t0 := time.Now()
	for i := range vms {
		vms[i] = VM{UUID: kdk.NewKeyID(), Name: fmt.Sprintf("vtpm-test-atonce-%d", i), KeyID: kdk.NewKeyID()}
		if err := s.Launch(vms[i], keys(key(byte(i)))); err != nil {
			t.Fatal(err)
		}
	}
	for _, vm := range vms {
		if _, err := s.Wait(context.Background(), vm.UUID); err != nil {
			t.Fatalf("%s: %v", vm.Name, err)
		}
		t.Cleanup(func() { s.Stop(context.Background(), vm.UUID) })
	}
	if took := time.Since(t0); took > n*ready/2 {
		t.Errorf("%d launches of vTPMs that each take %v to be ready took %v: their waits did not overlap", n, ready, took)
	}
	if most != 1 {
		t.Errorf("%d launches were in their spawn sections at once, want 1", most)
	}
}

// TestAdoptDuringLaunch: a hostd that dies while its vTPM is still starting (between the
// prepare and start hooks) left a record, and the next one adopts the process instead of
// leaving it running unknown with the state's lock.
func TestAdoptDuringLaunch(t *testing.T) {
	state, run := dirs(t)
	s := newSupervisor(t, state, run)
	f, err := os.CreateTemp("", "nkp-vtpm-slow-*.sh") // the vTPM user must reach it
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Cleanup(func() { os.Remove(f.Name()) })
	os.WriteFile(f.Name(), []byte("#!/bin/sh\nsleep 3\necho READY >&5\nexec sleep 30\n"), 0o755)
	os.Chmod(f.Name(), 0o755)
	s.cfg.Binary = f.Name()
	vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-adopt-launch", KeyID: kdk.NewKeyID()}
	if err := s.Launch(vm, keys(key(4))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		if inst, err := readRecord(s.recordPath(vm.UUID)); err == nil && !inst.Intent {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no record of the launching vTPM within 2 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The next hostd, while the first one's launch has not finished.
	next := newSupervisor(t, state, run)
	adopted, err := next.Adopt()
	if err != nil || len(adopted) != 1 || adopted[0].UUID != vm.UUID {
		t.Fatalf("Adopt during a launch = %+v, %v; want the launching vTPM", adopted, err)
	}
	if err := next.Stop(context.Background(), vm.UUID); err != nil {
		t.Errorf("Stop of the adopted vTPM: %v", err)
	}
}

// TestCrashLaunch kills a hostd (a helper process) right after each step of a vTPM start
// (intent record written, nkp-swtpm spawned, full record written) and starts a new
// supervisor as hostd does at its start (Adopt): at no instant may an nkp-swtpm be left
// running that the new supervisor does not know, since it would hold the state's lock and
// the VM could not start again. Every process on the VM's state directory must be the
// adopted one; Stop ends it; and a new Start of the VM then succeeds.
func TestCrashLaunch(t *testing.T) {
	if os.Getenv("NKP_VTPM_HELPER") != "" {
		t.Skip("helper")
	}
	nkpSwtpm(t)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	for _, step := range []string{"intent", "spawned", "recorded"} {
		t.Run(step, func(t *testing.T) {
			state, run := dirs(t)
			vm := VM{UUID: kdk.NewKeyID(), Name: "vtpm-test-crash", KeyID: kdk.NewKeyID(), KDKVersion: 2}
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperHostd$", "-test.count=1")
			cmd.Env = append(os.Environ(), "NKP_VTPM_HELPER=1", "H_STATE="+state, "H_RUN="+run, "H_BIN="+swtpmBin,
				"H_VM="+vm.UUID, "H_KEYID="+vm.KeyID, "H_CRASH_STEP="+step)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("helper was not killed at %s: %v\n%s", step, err, out)
			}
			stateDir := filepath.Join(state, vm.UUID, vm.KeyID)
			t.Cleanup(func() { // whatever the outcome, no process left behind by the test
				for _, pid := range procsOn(stateDir) {
					syscall.Kill(pid, syscall.SIGKILL)
					var ws unix.WaitStatus
					unix.Wait4(pid, &ws, 0, nil)
				}
			})

			s := newSupervisor(t, state, run)
			adopted, err := s.Adopt()
			if err != nil {
				t.Fatal(err)
			}
			running := procsOn(stateDir)
			switch {
			case step == "intent" && (len(adopted) != 0 || len(running) != 0):
				t.Fatalf("crash before the spawn: adopted %+v, running %v; want neither", adopted, running)
			case step != "intent" && (len(adopted) != 1 || len(running) != 1 || adopted[0].PID != running[0] || adopted[0].UUID != vm.UUID || adopted[0].KDKVersion != 2):
				t.Fatalf("crash after %s: adopted %+v, nkp-swtpm running on the state directory: %v; want that one adopted", step, adopted, running)
			}
			if step == "intent" {
				if ents, _ := os.ReadDir(run); len(ents) != 0 {
					t.Errorf("crash before the spawn left %v in the run directory", ents)
				}
			} else {
				if inst, err := readRecord(s.recordPath(vm.UUID)); err != nil || inst.Intent || inst.PID != running[0] {
					t.Errorf("record after adoption: %+v, %v; want the full record of pid %d", inst, err, running[0])
				}
				if err := s.Stop(context.Background(), vm.UUID); err != nil {
					t.Fatalf("Stop of the adopted vTPM: %v", err)
				}
				var ws unix.WaitStatus
				unix.Wait4(running[0], &ws, 0, nil) // our orphan now (subreaper)
			}
			// The state's lock is free: the VM's vTPM starts again.
			if _, err := s.Start(context.Background(), vm, keys(key(7))); err != nil {
				t.Fatalf("start after the crash and recovery: %v", err)
			}
			if err := s.Stop(context.Background(), vm.UUID); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// procsOn returns the live (not zombie) processes whose command line names dir as
// their --tpmstate directory.
func procsOn(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !stateDirArg(cmdline, dir) {
			continue
		}
		if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if st, _, err := parseStat(raw); err == nil && st != 'Z' && st != 'X' {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}
