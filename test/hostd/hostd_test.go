package hostd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
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

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/libvirtns"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

// nkpBinaries are the programs a host runs, where the vTPM user (tss) may execute them.
type nkpBinaries struct{ hostd, swtpm string }

func buildNKP(t *testing.T) nkpBinaries {
	t.Helper()
	b := nkpBinaries{hostd: e2e.BuildBinary(t, "./cmd/nkp-hostd"), swtpm: e2e.BuildBinary(t, "./cmd/nkp-swtpm")}
	// e2e's build directory is 0700; nkp-swtpm runs as the vTPM user.
	for d := filepath.Dir(b.swtpm); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if strings.HasPrefix(filepath.Base(d), "nkp-e2e-bin-") {
			os.Chmod(d, 0o755)
			break
		}
	}
	return b
}

// hostTPM is a host's TPM: nkp-swtpm serving TPM commands on a unix socket, with its
// control socket so that hostd can power it on. It outlives hostd restarts. A nil
// *hostTPM is a host without a TPM (KDKs in hostd's memory only).
type hostTPM struct{ *vtpmproc.HostTPM }

func startHostTPM(t *testing.T, swtpm string) *hostTPM {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "hosttpm")
	return &hostTPM{vtpmproc.HostTPMT(t, vtpmproc.Backend{Name: "nkp-swtpm (host TPM)", Path: swtpm}, dir)}
}

// vms is hostd's VM API (what nkpctl vm calls).
func (d *hostd) vms() *vmapi.Client { return vmapi.NewClient(d.h.Path("/run/nkp/hostd.sock")) }

// spec is the host TPM as hostd's --tpm flag names it; nil is a host without a TPM.
func (tpm *hostTPM) spec() string {
	if tpm == nil {
		return "none"
	}
	return tpm.Spec()
}

// hostd is a real nkp-hostd running inside a host, on the default paths there.
type hostd struct {
	h    *libvirtns.Host
	bins nkpBinaries
	tpm  *hostTPM
	args []string // extra flags for serve

	mu   sync.Mutex
	logs bytes.Buffer
	cmd  *exec.Cmd
	done chan struct{}
}

// joinHost joins h to the provider (token in a file) with its host TPM, then serves.
// serveArgs are extra flags for serve.
func joinHost(t *testing.T, h *libvirtns.Host, p *provider, tpm *hostTPM, bins nkpBinaries, serveArgs ...string) *hostd {
	t.Helper()
	d := &hostd{h: h, bins: bins, tpm: tpm, args: serveArgs}
	tok, caHash := p.token(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := h.Command(ctx, bins.hostd, "join", "--provider", p.url, "--ca-hash", caHash, "--token-file", tok,
		"--tpm", tpm.spec(), "--hostname", "nkpe2e-"+h.Name, "--log-format", "text").CombinedOutput()
	if err != nil {
		t.Fatalf("nkp-hostd join on host %s: %v\n%s", h.Name, err, out)
	}
	t.Cleanup(func() {
		d.kill()
		if t.Failed() {
			t.Logf("--- nkp-hostd on host %s ---\n%s", h.Name, d.Logs())
		}
	})
	d.start(t)
	return d
}

// start runs nkp-hostd serve and waits until /healthz answers 200 (it serves; /readyz
// also needs a usable KDK, which a host without a TPM lacks while the provider is down).
func (d *hostd) start(t *testing.T) {
	t.Helper()
	cmd := d.h.Command(context.Background(), d.bins.hostd, append([]string{"serve", "--tpm", d.tpm.spec(), "--swtpm", d.bins.swtpm,
		"--log-format", "text", "--log-level", "debug"}, d.args...)...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=", "WATCHDOG_USEC=")
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nkp-hostd: %v", err)
	}
	d.cmd, d.done = cmd, make(chan struct{})
	done := d.done
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			d.mu.Lock()
			d.logs.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
		}
	}()
	go func() { cmd.Wait(); pw.Close(); close(done) }()
	err := e2e.Poll(90*time.Second, func() bool {
		select {
		case <-done:
			return true
		default:
		}
		code, _, err := d.get("/healthz")
		return err == nil && code == http.StatusOK
	})
	select {
	case <-done:
		t.Fatalf("nkp-hostd on host %s exited at start (%v):\n%s", d.h.Name, cmd.ProcessState, d.Logs())
	default:
	}
	if err != nil {
		t.Fatalf("nkp-hostd on host %s not ready: %v\n%s", d.h.Name, err, d.Logs())
	}
}

// stop ends hostd with SIGTERM and waits for its exit.
func (d *hostd) stop(t *testing.T) {
	t.Helper()
	if d.cmd == nil {
		return
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("nkp-hostd on host %s did not stop within 60 s of SIGTERM:\n%s", d.h.Name, d.Logs())
	}
	d.cmd = nil
}

// kill ends hostd with SIGKILL (no chance to clean up) and waits.
func (d *hostd) kill() {
	if d.cmd != nil {
		d.cmd.Process.Kill()
		<-d.done
		d.cmd = nil
	}
}

// Logs is what hostd logged so far.
func (d *hostd) Logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := d.logs.Bytes()
	if len(b) > 12000 {
		b = b[len(b)-12000:]
	}
	return string(b)
}

// get sends GET path to hostd's local API socket.
func (d *hostd) get(path string) (int, []byte, error) {
	sock := d.h.Path("/run/nkp/hostd.sock")
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", sock)
		}}}
	resp, err := hc.Get("http://hostd" + path)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// hostStatus is the part of GET /v1/host the tests read.
type hostStatus struct {
	HostID     string `json:"host_id"`
	ProviderID string `json:"provider_id"`
	TPMBound   bool   `json:"tpm_bound"`
	KDKs       []struct {
		ID      string `json:"id"`
		Version int    `json:"version"`
		Primary bool   `json:"primary"`
		Err     string `json:"error"`
	} `json:"kdks"`
	VTPMs []json.RawMessage `json:"vtpms"`
}

func (d *hostd) status(t *testing.T) hostStatus {
	t.Helper()
	code, b, err := d.get("/v1/host")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /v1/host on host %s: %d %v %s", d.h.Name, code, err, b)
	}
	var s hostStatus
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("GET /v1/host: %v in %s", err, b)
	}
	return s
}

// primary is the host's primary KDK version.
func (s hostStatus) primary(t *testing.T) (id string, version int) {
	t.Helper()
	for _, k := range s.KDKs {
		if k.Primary {
			return k.ID, k.Version
		}
	}
	t.Fatalf("the host has no primary KDK: %+v", s.KDKs)
	return "", 0
}

// protectXML writes d's XML with nkp's metadata (provider, KDK and a new vTPM key ID)
// and its external vTPM at /run/nkp/vtpm/<uuid>.sock; it returns the file and the key ID.
func protectXML(t *testing.T, d domainSpec, dir, providerID, kdkID string, kdkVersion int) (path, keyID string) {
	t.Helper()
	return protectXMLKey(t, d, dir, providerID, kdkID, kdkVersion, uuid.NewString())
}

// protectXMLKey is protectXML with a given vTPM key ID.
func protectXMLKey(t *testing.T, d domainSpec, dir, providerID, kdkID string, kdkVersion int, keyID string) (string, string) {
	t.Helper()
	if d.UUID == "" {
		t.Fatal("protectXML needs the domain's UUID")
	}
	var buf bytes.Buffer
	if err := domainXML.Execute(&buf, d); err != nil {
		t.Fatal(err)
	}
	doc, err := domxml.SetMetadata(buf.Bytes(), &domxml.Metadata{ProviderID: providerID, Objects: []domxml.Object{
		{Name: domxml.ObjectVTPM, KeyID: keyID, KDKID: kdkID, KDKVersion: kdkVersion},
	}})
	if err != nil {
		t.Fatal(err)
	}
	tpm := domxml.External("tpm-tis", domxml.SocketPath("/run/nkp/vtpm", d.UUID))
	if doc, err = domxml.SetTPM(doc, &tpm); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, fmt.Sprintf("%s-%s.xml", d.Name, keyID[:8]))
	if err := os.WriteFile(path, doc, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, keyID
}
