package hostd_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/hostd"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/logbuf"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

// startSwtpmTPM runs Debian's swtpm as this host's TPM on a unix data socket (state kept
// in dir, so a restart keeps its endorsement seed) and returns its tpmdev spec.
func startSwtpmTPM(t *testing.T, dir string) string {
	t.Helper()
	return vtpmproc.HostTPMT(t, vtpmproc.SwtpmFor(t), dir).Spec()
}

// hostdProc is one `nkp-hostd serve` process.
type hostdProc struct {
	cmd  *exec.Cmd
	logs *logbuf.Buffer
	done chan struct{}
}

func serveBinary(t *testing.T, bin string, args ...string) *hostdProc {
	t.Helper()
	p := &hostdProc{cmd: exec.Command(bin, append([]string{"serve", "--log-format", "text"}, args...)...), logs: &logbuf.Buffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	notify := filepath.Join(t.TempDir(), "notify.sock")
	nl, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	p.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify, "WATCHDOG_USEC=")
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.done })
	nl.SetReadDeadline(time.Now().Add(60 * time.Second))
	buf := make([]byte, 256)
	n, err := nl.Read(buf)
	if err != nil || !strings.Contains(string(buf[:n]), "READY=1") {
		t.Fatalf("no READY=1 from nkp-hostd (%q, %v):\n%s", buf[:n], err, p.logs.String())
	}
	return p
}

// TestBinaryKill9: the nkp-hostd program joined with a socket TPM (swtpm), serving, is
// killed with SIGKILL while a VM's vTPM runs; the vTPM survives, a new nkp-hostd re-adopts
// it (with the provider down), and its release stops it.
func TestBinaryKill9(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, "swtpm", "swtpm_ioctl")
	// Orphaned nkp-swtpm come to this process (PID 1 here does not reap).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	bin := e2e.BuildBinary(t, "./cmd/nkp-hostd")
	p := startProvider(t)
	state, run := hostDirs(t)
	spec := startSwtpmTPM(t, filepath.Join(t.TempDir(), "hosttpm"))
	tok := p.token(t)

	// join: the token on stdin, never argv.
	join := exec.Command(bin, "join", "--provider", p.url, "--ca-hash", tok.CAHash, "--token-stdin", "--state-dir", state, "--tpm", spec, "--log-format", "text")
	join.Stdin = strings.NewReader(tok.Secret + "\n")
	out, err := join.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "TPM-bound") {
		t.Fatalf("nkp-hostd join: %v\n%s", err, out)
	}
	// A second join is refused, with the way out.
	again := exec.Command(bin, "join", "--provider", p.url, "--ca-hash", tok.CAHash, "--token-stdin", "--state-dir", state, "--tpm", spec)
	again.Stdin = strings.NewReader("x\n")
	if out, err := again.CombinedOutput(); err == nil || !strings.Contains(string(out), "joined already") {
		t.Errorf("second join: %v %s", err, out)
	}
	args := []string{"--state-dir", state, "--run-dir", run, "--tpm", spec, "--swtpm", swtpmBinary(t), "--libvirt", "-"}
	hp := serveBinary(t, bin, args...)
	h := &host{t: t, state: state, run: run}
	var st hostd.HostStatus
	e2e.WaitFor(t, 30*time.Second, "the first KDK release", func() bool { st = h.status(); return len(st.KDKs) == 1 })

	a := newVM("hostd-test-kill9")
	k := st.KDKs[0]
	xml := vmXML(t, run, a.name, a.uuid, st.ProviderID, k.ID, k.Version, a.keyID)
	for _, op := range []string{"prepare", "start"} { // start waits until the vTPM serves
		if code, stderr, _ := hook(t, run, xml, a.name, op, "begin", "-"); code != 0 {
			t.Fatalf("%s: %d %s\n%s", op, code, stderr, hp.logs.String())
		}
	}
	vt := h.status().VTPMs[0]

	p.kill()
	hp.cmd.Process.Signal(syscall.SIGKILL)
	<-hp.done
	// The vTPM outlived its hostd.
	if err := syscall.Kill(vt.PID, 0); err != nil {
		t.Fatalf("nkp-swtpm (pid %d) died with nkp-hostd: %v", vt.PID, err)
	}
	hp = serveBinary(t, bin, args...)
	st = h.status()
	if len(st.VTPMs) != 1 || st.VTPMs[0].PID != vt.PID || len(st.KDKs) != 1 {
		t.Fatalf("after kill -9 and restart: %+v\n%s", st, hp.logs.String())
	}
	if !strings.Contains(hp.logs.String(), "vTPM adopted") {
		t.Errorf("no adoption logged:\n%s", hp.logs.String())
	}
	// The re-adopted vTPM serves QEMU's INIT.
	if out, err := exec.Command("swtpm_ioctl", "--unix", vt.Socket, "-i").CombinedOutput(); err != nil {
		t.Fatalf("INIT on the re-adopted vTPM: %v %s", err, out)
	}
	// A second VM starts with the provider down, from the swtpm-held cache.
	b := newVM("hostd-test-kill9-b")
	xmlB := vmXML(t, run, b.name, b.uuid, st.ProviderID, k.ID, k.Version, b.keyID)
	code, stderr, _ := hook(t, run, xmlB, b.name, "prepare", "begin", "-")
	if code != 0 {
		t.Fatalf("prepare with the provider down after a restart: %d %s\n%s", code, stderr, hp.logs.String())
	}
	for _, v := range []struct{ name, xml string }{{a.name, xml}, {b.name, xmlB}} {
		if code, stderr, _ := hook(t, run, v.xml, v.name, "release", "end", "-"); code != 0 {
			t.Fatalf("release %s: %d %s", v.name, code, stderr)
		}
	}
	if n := len(h.status().VTPMs); n != 0 {
		t.Errorf("%d vTPMs after release", n)
	}
	var ws unix.WaitStatus
	for range 10 {
		unix.Wait4(-1, &ws, unix.WNOHANG, nil) // reap the orphans that came to us
	}
	// SIGTERM: a clean stop.
	hp.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-hp.done:
		if c := hp.cmd.ProcessState.ExitCode(); c != 0 {
			t.Errorf("exit %d after SIGTERM:\n%s", c, hp.logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("nkp-hostd did not stop on SIGTERM")
	}
}

// TestStartRefusals: Start names the bad setting.
func TestStartRefusals(t *testing.T) {
	state, run := hostDirs(t)
	tests := []struct {
		name string
		cfg  hostd.Config
		want string
	}{
		{"not joined", hostd.Config{StateDir: state, RunDir: run, SwtpmBinary: "/bin/true", LibvirtURI: "-"}, "run `nkp-hostd join"},
		{"relative dir", hostd.Config{StateDir: "rel", SwtpmBinary: "/bin/true"}, "--state-dir"},
		{"root vTPM user", hostd.Config{StateDir: state, VTPMUser: "root", SwtpmBinary: "/bin/true"}, "must not run as root"},
		{"no such user", hostd.Config{StateDir: state, QEMUUser: "no-such-user-xyz", SwtpmBinary: "/bin/true"}, "--qemu-user"},
		{"no swtpm", hostd.Config{StateDir: state, SwtpmBinary: "/nonexistent/nkp-swtpm"}, "--swtpm"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := hostd.Start(context.Background(), tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Start: %v, want %q", err, tt.want)
			}
		})
	}
	_ = fmt.Sprint
	_ = json.Marshal
}
