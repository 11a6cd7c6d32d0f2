package vtpm

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/guest/guesttest"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

// Timeouts are generous: the machine is shared and QEMU runs without KVM.
const (
	bootTimeout    = 4 * time.Minute  // boot to the agent's last line
	backendTimeout = 60 * time.Second // a process to listen, QEMU to resume
	exitTimeout    = 60 * time.Second
)

func TestMain(m *testing.M) {
	code := m.Run()
	e2e.Cleanup()
	if nkpBin.tmp != "" {
		os.RemoveAll(nkpBin.tmp)
	}
	os.Exit(code)
}

// backend is a vTPM program that takes swtpm's `socket` command line.
type backend = vtpmproc.Backend

// backends returns the table every test runs: Debian's swtpm and nkp-swtpm.
func backends(t *testing.T) []backend {
	t.Helper()
	var bs []backend
	if p, err := exec.LookPath("swtpm"); err == nil {
		bs = append(bs, backend{Name: "swtpm", Path: p})
	} else if e2e.Required() {
		t.Fatalf("swtpm not on PATH and NKP_E2E=required: install swtpm (make setup)")
	} else {
		t.Logf("swtpm not on PATH: its cases are skipped (make setup installs it)")
	}
	if p, ok := nkpSwtpm(t); ok {
		bs = append(bs, backend{Name: "nkp-swtpm", Path: p})
	}
	return bs
}

var nkpBin struct {
	sync.Once
	path, why string
	tmp       string // build directory, removed by TestMain
}

// nkpSwtpm finds or builds nkp-swtpm once per test binary.
func nkpSwtpm(t *testing.T) (string, bool) {
	nkpBin.Do(func() {
		if dir := os.Getenv(e2e.EnvBin); dir != "" {
			if st, err := os.Stat(filepath.Join(dir, "nkp-swtpm")); err == nil && st.Mode()&0o111 != 0 {
				nkpBin.path = filepath.Join(dir, "nkp-swtpm")
				return
			}
		}
		root, err := e2e.ModuleRoot()
		if err != nil {
			nkpBin.why = err.Error()
			return
		}
		dir, err := os.MkdirTemp("", "nkp-vtpm-bin-")
		if err != nil {
			nkpBin.why = err.Error()
			return
		}
		nkpBin.tmp = dir
		out := filepath.Join(dir, "nkp-swtpm")
		cmd := exec.Command("go", "build", "-o", out, "./cmd/nkp-swtpm")
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			nkpBin.why = fmt.Sprintf("go build ./cmd/nkp-swtpm: %v\n%s", err, b)
			return
		}
		nkpBin.path = out
	})
	if nkpBin.path == "" {
		if e2e.Required() {
			t.Fatalf("nkp-swtpm unavailable and NKP_E2E=required: %s", nkpBin.why)
		}
		t.Logf("nkp-swtpm unavailable, its cases are skipped: %s", nkpBin.why)
		return "", false
	}
	return nkpBin.path, true
}

// workDir makes a directory that QEMU's user (libvirt-qemu) can traverse but not list,
// removed at the end of the test.
func workDir(t *testing.T) string {
	t.Helper()
	return e2e.TraversableDir(t, "nkp-vtpm-")
}

// newKey returns a random 256-bit state key.
func newKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// vtpm is one backend process serving a control socket.
type vtpm struct {
	be     backend
	sock   string
	state  string
	log    string
	proc   *vtpmproc.Proc
	stderr bytes.Buffer // stdout and stderr, to read once the process exited
}

// startVTPM starts be on stateDir with the state encrypted under key (64 hex digits on fd
// 3, as swtpm reads --key fd= by default) and waits until its control socket accepts.
// When qemuGroup is set the socket is handed to group kvm (mode 0660) for libvirt-qemu.
func startVTPM(t *testing.T, be backend, dir, name, stateDir string, key []byte, qemuGroup bool) *vtpm {
	t.Helper()
	v := launchVTPM(t, be, dir, name, stateDir, key)
	if v.exited() {
		t.Fatalf("%s exited at start: %v\n%s%s", be.Name, v.proc.Err(), v.stderr.String(), v.logTail())
	}
	if qemuGroup {
		if err := chownQEMU(v.sock); err != nil {
			t.Fatal(err)
		}
	}
	return v
}

// launchVTPM starts the backend and waits until its control socket accepts or it exits
// (check v.exited()); it fails the test only when neither happens in time.
func launchVTPM(t *testing.T, be backend, dir, name, stateDir string, key []byte) *vtpm {
	t.Helper()
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	v := &vtpm{
		be:    be,
		sock:  filepath.Join(dir, name+".sock"),
		state: stateDir,
		log:   filepath.Join(dir, name+".log"),
	}
	os.Remove(v.sock) // a socket file left by the previous process on this path
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	hexKey := []byte(hex.EncodeToString(key))
	_, werr := w.Write(hexKey)
	w.Close()
	clear(hexKey)
	if werr != nil {
		r.Close()
		t.Fatalf("write the key to the pipe: %v", werr)
	}
	v.proc, err = vtpmproc.Start(be, vtpmproc.Options{
		Args: cmdline.Options{
			TPM2:      true,
			State:     &cmdline.StateOptions{Dir: stateDir, Mode: 0o600},
			Ctrl:      &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: v.sock, Mode: 0o660},
			Key:       &cmdline.KeyOptions{FD: 3, Mode: "aes-256-cbc"},
			Log:       &cmdline.LogOptions{File: v.log, Level: 2},
			Terminate: true,
		},
		Files:  []*os.File{r},
		Output: &v.stderr,
	})
	r.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		v.kill(t)
		if t.Failed() {
			t.Log(v.logTail()) // before workDir's cleanup removes it
		}
	})
	err = v.proc.WaitListening(backendTimeout, v.sock)
	if err != nil && !errors.Is(err, vtpmproc.ErrExited) {
		t.Fatalf("%s control socket %s: %v\n%s", be.Name, v.sock, err, v.logTail())
	}
	return v
}

func (v *vtpm) exited() bool { return v.proc.Exited() }

// waitExit waits for the backend to end by itself (QEMU's CMD_SHUTDOWN, or --terminate).
func (v *vtpm) waitExit(t *testing.T) {
	t.Helper()
	if _, ok := v.proc.WaitExit(exitTimeout); !ok {
		t.Fatalf("%s did not exit within %v after QEMU stopped\n%s", v.be.Name, exitTimeout, v.logTail())
	}
}

// kill stops the backend (SIGTERM, then SIGKILL after 10 s).
func (v *vtpm) kill(t *testing.T) { v.proc.Stop(10 * time.Second) }

func (v *vtpm) logTail() string {
	b, err := os.ReadFile(v.log)
	if err != nil {
		return ""
	}
	if len(b) > 6000 {
		b = b[len(b)-6000:]
	}
	return fmt.Sprintf("--- %s log %s ---\n%s", v.be.Name, v.log, b)
}

// chownQEMU makes path readable and writable by QEMU under libvirt (group kvm, 0660).
func chownQEMU(path string) error {
	g, err := user.LookupGroup("kvm")
	if err != nil {
		return fmt.Errorf("group kvm (QEMU's group under libvirt): %w", err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	if err := os.Chown(path, -1, gid); err != nil {
		return fmt.Errorf("chown %s to group kvm: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	return nil
}

// console reads a serial console file as the guest writes it.
type console string

func (c console) records() []guest.Record { return guesttest.ConsoleRecords(string(c)) }

func (c console) tail() string { return guesttest.ConsoleTail(string(c)) }

// Reasons why console.poll ends without its condition.
var (
	errGone        = errors.New("the VM stopped")
	errAgentFailed = errors.New("the guest agent failed")
)

// waitFor polls the console until cond holds on its records, the VM stops (stopped
// returns true) or bootTimeout passes. It returns the records that satisfied cond.
func (c console) waitFor(t *testing.T, what string, stopped func() bool, cond func([]guest.Record) bool) []guest.Record {
	t.Helper()
	recs, err := c.poll(stopped, cond)
	if err != nil {
		t.Fatalf("waiting for the guest to print %s: %v\n%s", what, err, c.tail())
	}
	return recs
}

// poll is waitFor without failing the test: it returns errAgentFailed when the agent
// printed done=fail, errGone when the VM stopped first, or e2e.ErrTimeout (wrapped).
func (c console) poll(stopped func() bool, cond func([]guest.Record) bool) ([]guest.Record, error) {
	var recs []guest.Record
	var gone, failed bool
	err := e2e.Poll(bootTimeout, func() bool {
		recs = c.records()
		if cond(recs) {
			return true
		}
		if has("done", "fail")(recs) {
			failed = true
			return true
		}
		if stopped != nil && stopped() {
			// One last read: the line may have landed just before the exit.
			recs = c.records()
			gone = !cond(recs)
			return true
		}
		return false
	})
	if gone {
		err = errGone
	}
	if failed {
		err = errAgentFailed
	}
	return recs, err
}

// crash returns the console line that shows the guest itself crashed, or "" when there
// is none: a kernel oops, BUG or panic, or a Go program (the agent) killed by a fault
// outside Go code, which the Go runtime reports with a bare "SIGSEGV: ..." header and a
// wild PC. Neither can come from a TPM answer: a bad answer makes the agent print error=
// and done=fail, and a Go bug that dereferences nil panics with "panic: runtime error".
func (c console) crash() string {
	b, _ := os.ReadFile(string(c))
	return guestCrash(b)
}

// kernelCrashMarks are the words the Linux kernel prints when it crashes: an oops
// ("Oops: 0000 [#1]", "general protection fault", "invalid opcode"), a BUG, the end of
// an oops trace, or the panic that oops=panic turns every oops into.
var kernelCrashMarks = []string{
	"Kernel panic - not syncing", "Oops: ", "BUG: ", "general protection fault",
	"invalid opcode: ", "---[ end trace",
}

// guestCrash is console.crash on the console's bytes: the first crash line.
func guestCrash(b []byte) string {
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimRight(line, "\r")
		for _, m := range kernelCrashMarks {
			if strings.Contains(line, m) {
				return line
			}
		}
		for _, sig := range []string{"SIGSEGV: ", "SIGBUS: ", "SIGILL: "} {
			if strings.HasPrefix(line, sig) {
				return line
			}
		}
	}
	return ""
}

// has is a condition: some record has key (with value, when value != "").
func has(key, value string) func([]guest.Record) bool {
	return func(recs []guest.Record) bool {
		for _, r := range recs {
			if v, ok := r[key]; ok && (value == "" || v == value) {
				return true
			}
		}
		return false
	}
}

// loopConfig is the guest of the save/restore and migration tests: it writes nv to NV,
// extends PCR16 with extend, then prints a loop line every second for ten minutes.
func loopConfig(nv, extend string) guest.Config {
	return guest.Config{
		Actions: []string{guest.ActionNVWrite, guest.ActionExtend, guest.ActionLoop},
		NV:      nv, Extend: extend, Loop: 600,
	}
}

// waitLoopAfter waits for a loop line numbered above n: the guest runs again (after a
// restore or a migration). It returns the records.
func (c console) waitLoopAfter(t *testing.T, n int, stopped func() bool) []guest.Record {
	t.Helper()
	return c.waitFor(t, fmt.Sprintf("a loop line after #%d", n), stopped, func(r []guest.Record) bool {
		return lastLoopIndex(r) > n
	})
}

// lastValues returns the last value of each key in recs ("" when there is none).
func lastValues(recs []guest.Record, keys ...string) map[string]string {
	m := make(map[string]string, len(keys))
	for _, k := range keys {
		m[k], _ = guest.Last(recs, k)
	}
	return m
}

// checkKept checks that after what (a restore, a migration, a restart) the guest
// reports what it reported before: for each key of before, its last value in recs.
func checkKept(t *testing.T, what string, recs []guest.Record, before map[string]string) {
	t.Helper()
	for _, k := range slices.Sorted(maps.Keys(before)) {
		if v, _ := guest.Last(recs, k); v != before[k] {
			t.Errorf("after %s the guest reports %s=%q, want %q (as before)", what, k, v, before[k])
		}
	}
}

// checkTPMInfo asserts what every boot must show: a TPM 2.0 and a firmware-measured PCR0.
func checkTPMInfo(t *testing.T, recs []guest.Record) {
	t.Helper()
	if v, _ := guest.Last(recs, "tpm"); v != "2.0" {
		t.Errorf("guest reports TPM version %q, want 2.0", v)
	}
	if v, _ := guest.Last(recs, "tpm-major"); v != "2" {
		t.Errorf("guest's /sys/class/tpm/tpm0/tpm_version_major = %q, want 2", v)
	}
	pcr0, _ := guest.Last(recs, "pcr0")
	if len(pcr0) != 64 || pcr0 == strings.Repeat("0", 64) {
		t.Errorf("guest's PCR0 (sha256) = %q, want 64 hex digits, not all zero (SeaBIOS measures itself)", pcr0)
	}
	if v, _ := guest.Last(recs, "error"); v != "" {
		t.Errorf("guest agent error: %s", v)
	}
}
