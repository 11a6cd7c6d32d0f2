package hostd_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"

	"github.com/nkp-dev/nkp/hostd"
	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/logbuf"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// provider is one running nkp-provider serve with its admin directory.
type provider struct {
	bin, ctl, dir, url string
	cmd                *exec.Cmd
	done               chan struct{}
	mu                 sync.Mutex
	logs               bytes.Buffer
}

func startProvider(t *testing.T) *provider {
	t.Helper()
	p := &provider{bin: e2e.BuildBinary(t, "./cmd/nkp-provider"), ctl: e2e.BuildBinary(t, "./cmd/nkpctl"), dir: filepath.Join(t.TempDir(), "provider")}
	if out, err := exec.Command(p.bin, "init", "--dir", p.dir, "--log-format", "text").CombinedOutput(); err != nil {
		t.Fatalf("nkp-provider init: %v\n%s", err, out)
	}
	p.serve(t, "127.0.0.1:0")
	p.mustCtl(t, "", "backup", "--passphrase-file", writeFile(t, "nkp hostd test passphrase 42"), "--out", filepath.Join(t.TempDir(), "b.age"))
	return p
}

func writeFile(t *testing.T, s string) string {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// serve (re)starts the provider on addr and waits until it listens.
func (p *provider) serve(t *testing.T, addr string) {
	t.Helper()
	cmd := exec.Command(p.bin, "serve", "--dir", p.dir, "--listen", addr, "--log-format", "json", "--shutdown-timeout", "2s")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=", "WATCHDOG_USEC=")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	done := p.done
	got := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.logs.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "provider serving" {
				select {
				case got <- rec.Addr:
				default:
				}
			}
		}
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(p.kill)
	select {
	case a := <-got:
		p.url = "https://" + a
	case <-done:
		t.Fatalf("nkp-provider exited:\n%s", p.logs.String())
	case <-time.After(60 * time.Second):
		t.Fatal("nkp-provider did not listen within 60 s")
	}
}

func (p *provider) kill() {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *provider) mustCtl(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(p.ctl, append(append([]string{"provider", "--dir", p.dir}, args...), "--provider", p.url)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("nkpctl provider %s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String()
}

func (p *provider) token(t *testing.T) apiv1.Token {
	t.Helper()
	var tok apiv1.Token
	if err := json.Unmarshal([]byte(p.mustCtl(t, "", "token", "create", "--ttl", "10m", "--json")), &tok); err != nil {
		t.Fatal(err)
	}
	return tok
}

// hostTPM is the go-tpm-tools simulator as this host's TPM. It outlives daemon restarts
// (the simulator has no state export): the daemon's Close of it is a no-op.
type hostTPM struct{ sim *simulator.Simulator }

func newHostTPM(t *testing.T) *hostTPM {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("TPM simulator: %v", err)
	}
	h := &hostTPM{sim: sim}
	t.Cleanup(func() { h.sim.Close() })
	return h
}

func (h *hostTPM) open() (io.ReadWriter, io.Closer, error) { return h.sim, io.NopCloser(nil), nil }

// swtpmBinary builds nkp-swtpm where the vTPM user can run it.
func swtpmBinary(t *testing.T) string {
	t.Helper()
	bin := e2e.BuildBinary(t, "./cmd/nkp-swtpm")
	for d := filepath.Dir(bin); d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755) // nkp-e2e-bin-* is 0700
		if strings.HasPrefix(filepath.Base(d), "nkp-e2e-bin-") {
			break
		}
	}
	return bin
}

// hostDirs are a state and a run directory under a base the vTPM user may traverse.
func hostDirs(t *testing.T) (state, run string) {
	base := e2e.TraversableDir(t, "nkp-hostd-test-")
	// nkp-swtpm outlives hostd by design, so a test that ends (or fails) with a vTPM
	// still running would leave it behind; this cleanup runs after the daemon's Close
	// (registered later) and before the directory's removal (registered earlier).
	t.Cleanup(func() { stopVTPMsUnder(t, base) })
	return filepath.Join(base, "state"), filepath.Join(base, "run")
}

// stopVTPMsUnder kills every process whose command line names a path under dir (the
// nkp-swtpm instances of a test's hostd) and waits up to 10 s for each to be gone.
func stopVTPMsUnder(t *testing.T, dir string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var pids []int
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.Contains(b, []byte(dir+"/")) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(f, "/proc/%d/cmdline", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			t.Logf("killed pid %d left running under %s: %s", pid, dir, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, syscall.WNOHANG, nil) // our child (in-process hostd) or a subreaped orphan
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil || bytes.Contains(st, []byte(") Z ")) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// host is one hostd (restartable) with its directories and TPM.
type host struct {
	t          *testing.T
	state, run string
	tpm        *hostTPM
	swtpm      string
	logs       *logbuf.Buffer
	d          *hostd.Daemon
	renew      time.Duration
	libvirt    string // "" = none ("-")
}

func newHost(t *testing.T, p *provider, tpm *hostTPM) *host {
	t.Helper()
	e2e.RequireRoot(t)
	state, run := hostDirs(t)
	h := &host{t: t, state: state, run: run, tpm: tpm, swtpm: swtpmBinary(t), logs: &logbuf.Buffer{}}
	tok := p.token(t)
	cfg := hostd.JoinConfig{StateDir: state, Providers: []string{p.url}, CAHash: tok.CAHash, Token: tok.Secret, Hostname: "hostd-test"}
	if tpm != nil {
		cfg.OpenTPM = tpm.open
	} else {
		cfg.TPM = hostd.TPMNone
	}
	if _, err := hostd.Join(context.Background(), cfg); err != nil {
		t.Fatalf("join: %v", err)
	}
	return h
}

func (h *host) start() *hostd.Daemon {
	h.t.Helper()
	uri := h.libvirt
	if uri == "" {
		uri = "-"
	}
	cfg := hostd.Config{StateDir: h.state, RunDir: h.run, SwtpmBinary: h.swtpm, LibvirtURI: uri, SyncInterval: time.Hour, RenewBefore: h.renew,
		Log: slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	if h.tpm != nil {
		cfg.OpenTPM = h.tpm.open
	} else {
		cfg.TPM = hostd.TPMNone
	}
	d, err := hostd.Start(context.Background(), cfg)
	if err != nil {
		h.t.Fatalf("hostd.Start: %v\n%s", err, h.logs.String())
	}
	<-d.Ready()
	h.d = d
	h.t.Cleanup(func() { d.Close() })
	return d
}

// api GETs path on the daemon's local API socket.
func (h *host) api(path string) (int, string) {
	h.t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(h.run, "hostd.sock"))
	}}, Timeout: 10 * time.Second}
	resp, err := c.Get("http://hostd" + path)
	if err != nil {
		h.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (h *host) status() hostd.HostStatus {
	h.t.Helper()
	_, body := h.api(hostd.PathHost)
	var s hostd.HostStatus
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		h.t.Fatalf("%s: %v", body, err)
	}
	return s
}

// vmXML is a protected domain for this host: metadata naming the given provider, KDK
// and key, and nkp's external TPM backend.
func vmXML(t *testing.T, runDir, name, uuid, providerID, kdkID string, kdkVersion int, keyID string) string {
	t.Helper()
	base := fmt.Sprintf("<domain type='qemu'>\n  <name>%s</name>\n  <uuid>%s</uuid>\n  <memory>131072</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n  <devices>\n  </devices>\n</domain>\n", name, uuid)
	doc, err := domxml.SetMetadata([]byte(base), &domxml.Metadata{ProviderID: providerID, Objects: []domxml.Object{{Name: domxml.ObjectVTPM, KeyID: keyID, KDKID: kdkID, KDKVersion: kdkVersion}}})
	if err != nil {
		t.Fatal(err)
	}
	tpm := domxml.External("", domxml.SocketPath(filepath.Join(runDir, "vtpm"), uuid))
	if doc, err = domxml.SetTPM(doc, &tpm); err != nil {
		t.Fatal(err)
	}
	return string(doc)
}

// hook runs the real nkp-hook as libvirtd does: argv, XML on stdin.
func hook(t *testing.T, runDir, xml string, args ...string) (int, string, time.Duration) {
	t.Helper()
	cmd := exec.Command(e2e.BuildBinary(t, "./cmd/nkp-hook"), args...)
	cmd.Env = []string{"NKP_HOOK_SOCKET=" + filepath.Join(runDir, "hook.sock"), "NKP_HOOK_CONFIG=/dev/null"}
	cmd.Stdin = strings.NewReader(xml)
	var stderr, stdout bytes.Buffer
	cmd.Stderr, cmd.Stdout = &stderr, &stdout
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	if stdout.Len() != 0 {
		t.Errorf("nkp-hook wrote to stdout: %q", stdout.String())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), stderr.String(), took
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, stderr.String(), took
}
