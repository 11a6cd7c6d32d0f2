package hostd

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/e2e"
)

// provider is a real nkp-provider: initialised, backed up (so it releases KDKs) and
// serving on one address of the root network namespace that every host reaches through
// its uplink.
type provider struct {
	bin, nkpctl string
	dir         string // provider directory, also nkpctl's admin credentials
	pass        string // the backup passphrase's file
	addr        string // host:port it serves on (kept across restarts)
	url         string

	mu   sync.Mutex
	logs bytes.Buffer
	cmd  *exec.Cmd
	done chan struct{}
}

// startProvider initialises a provider in a new directory, serves it on ip (a port
// chosen at the first start, kept afterwards), and takes its first backup.
func startProvider(t *testing.T, ip string) *provider {
	t.Helper()
	p := &provider{bin: e2e.BuildBinary(t, "./cmd/nkp-provider"), nkpctl: e2e.BuildBinary(t, "./cmd/nkpctl"),
		dir: filepath.Join(t.TempDir(), "provider"), addr: ip + ":0"}
	if out, err := exec.Command(p.bin, "init", "--dir", p.dir, "--log-format", "text").CombinedOutput(); err != nil {
		t.Fatalf("nkp-provider init: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("--- nkp-provider ---\n%s", p.Logs())
		}
	})
	p.start(t)
	pass := filepath.Join(t.TempDir(), "passphrase")
	if err := os.WriteFile(pass, []byte("hostd-e2e backup passphrase"), 0o600); err != nil {
		t.Fatal(err)
	}
	p.pass = pass
	p.backup(t)
	return p
}

// backup takes a backup (needed before the provider releases a new KDK version too). Its
// scrypt can outlast nkpctl's request timeout on a loaded machine: it tries three times.
func (p *provider) backup(t *testing.T) {
	t.Helper()
	var err error
	for range 3 {
		if _, err = p.tryCtl("backup", "--passphrase-file", p.pass, "--out", filepath.Join(t.TempDir(), "backup.age")); err == nil {
			return
		}
		t.Logf("backup: %v; again", err)
	}
	t.Fatal(err)
}

// start serves the provider (again) and waits until it listens.
func (p *provider) start(t *testing.T) {
	t.Helper()
	ip, _, _ := strings.Cut(p.addr, ":")
	cmd := exec.Command(p.bin, "serve", "--dir", p.dir, "--listen", p.addr, "--san", ip, "--log-format", "json",
		"--shutdown-timeout", "5s")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=", "WATCHDOG_USEC=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nkp-provider: %v", err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	done := p.done
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.logs.WriteString(line + "\n")
			p.mu.Unlock()
			var rec struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "provider serving" {
				select {
				case addr <- rec.Addr:
				default:
				}
			}
		}
		cmd.Wait()
		close(done)
	}()
	select {
	case a := <-addr:
		p.addr, p.url = a, "https://"+a
	case <-done:
		t.Fatalf("nkp-provider serve exited before listening:\n%s", p.Logs())
	case <-time.After(60 * time.Second):
		t.Fatalf("nkp-provider serve did not listen within 60 s:\n%s", p.Logs())
	}
}

// stop ends the provider with SIGTERM and waits.
func (p *provider) stop(t *testing.T) {
	t.Helper()
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("nkp-provider did not stop within 30 s of SIGTERM:\n%s", p.Logs())
	}
	p.cmd = nil
}

func (p *provider) kill() {
	if p.cmd != nil {
		p.cmd.Process.Kill()
		<-p.done
		p.cmd = nil
	}
}

// Logs is what the provider logged so far.
func (p *provider) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// ctl runs `nkpctl provider ARGS` as the provider's first admin and returns stdout.
func (p *provider) ctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := p.tryCtl(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// tryCtl is ctl that returns the error (with nkpctl's stderr).
func (p *provider) tryCtl(args ...string) (string, error) {
	full := append(append([]string{"provider", "--dir", p.dir}, args...), "--provider", p.url)
	cmd := exec.Command(p.nkpctl, full...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nkpctl provider %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// token creates a join token and writes its secret to a 0600 file (hostd reads it from
// a file, never argv); it returns the file and the CA hash.
func (p *provider) token(t *testing.T) (file, caHash string) {
	t.Helper()
	var tok apiv1.Token
	out := p.ctl(t, "token", "create", "--ttl", "10m", "--json")
	if err := json.Unmarshal([]byte(out), &tok); err != nil {
		t.Fatalf("token create --json: %v in %q", err, out)
	}
	if tok.Secret == "" || !strings.HasPrefix(tok.CAHash, "sha256:") {
		t.Fatalf("token create printed %q", out)
	}
	file = filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(tok.Secret), 0o600); err != nil {
		t.Fatal(err)
	}
	return file, tok.CAHash
}
