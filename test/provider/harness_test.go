// Package provider_test drives the real nkp-provider and nkpctl binaries end to end: the
// whole lifecycle on bbolt, refusals (no backup, bad tokens, foreign and missing client
// certificates, revoked hosts), backups (wrong passphrase, truncated and tampered archives,
// `age -d` through a pty), two replicas on a real etcd with one killed mid-run, and KDK
// import blobs unwrapped by a (simulated) TPM. Simulated hosts are in-process
// provider/client users.
package provider_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
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

	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// bins are the programs under test.
type bins struct{ provider, nkpctl string }

func build(t *testing.T) bins {
	t.Helper()
	return bins{provider: e2e.BuildBinary(t, "./cmd/nkp-provider"), nkpctl: e2e.BuildBinary(t, "./cmd/nkpctl")}
}

// server is one running `nkp-provider serve`.
type server struct {
	t     *testing.T
	dir   string
	url   string
	cmd   *exec.Cmd
	done  chan struct{}
	notes chan string // the sd_notify messages it sent, in order

	mu   sync.Mutex
	logs bytes.Buffer
}

// serve starts nkp-provider serve on a free loopback port and waits until it is ready.
func (b bins) serve(t *testing.T, dir string, extra ...string) *server {
	t.Helper()
	return b.serveEnv(t, dir, nil, extra...)
}

// serveEnv is serve with extra environment variables. The test makes the listening
// socket and hands it over as systemd does (LISTEN_FDS, LISTEN_PID), so it knows the
// address before the process starts; readiness is the READY=1 the process sends to the
// unix datagram socket the test listens on (NOTIFY_SOCKET), as systemd waits for it.
func (b bins) serveEnv(t *testing.T, dir string, env []string, extra ...string) *server {
	t.Helper()
	s, ln := b.serveOn(t, dir, env, extra...)
	ln.Close() // the process has its own copy; a dead process must leave no listener behind
	return s
}

// serveOn is serveEnv that also returns the test's copy of the listening socket (the
// caller closes it).
func (b bins) serveOn(t *testing.T, dir string, env []string, extra ...string) (*server, *net.TCPListener) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	lnFile, err := ln.File() // a duplicate, for the child's fd 3
	if err != nil {
		t.Fatal(err)
	}
	defer lnFile.Close()
	notifyDir, err := os.MkdirTemp("", "nkpn") // short: sun_path holds 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(notifyDir) })
	notifyPath := filepath.Join(notifyDir, "notify")
	notify := listenNotify(t, notifyPath)

	args := append([]string{"serve", "--dir", dir, "--listen", "127.0.0.1:0", "--log-format", "json",
		"--shutdown-timeout", "5s"}, extra...)
	// LISTEN_PID must be the pid of the process that execs nkp-provider: sh sets it to
	// its own and execs in place.
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, b.provider}, args...)...)
	cmd.Env = append(append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=", "NOTIFY_SOCKET="+notifyPath, "WATCHDOG_USEC="), env...)
	cmd.ExtraFiles = []*os.File{lnFile}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nkp-provider: %v", err)
	}
	s := &server{t: t, dir: dir, url: "https://" + ln.Addr().String(), cmd: cmd, done: make(chan struct{}), notes: make(chan string, 1024)}
	go func() {
		buf := make([]byte, 512)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				return // closed at cleanup
			}
			select {
			case s.notes <- string(buf[:n]):
			default:
			}
		}
	}()
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			s.mu.Lock()
			s.logs.WriteString(sc.Text() + "\n")
			s.mu.Unlock()
		}
		cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() { s.kill() })
	select {
	case n := <-s.notes:
		if n != "READY=1" {
			t.Fatalf("first sd_notify message %q, want READY=1:\n%s", n, s.Logs())
		}
	case <-s.done:
		t.Fatalf("nkp-provider serve exited before it was ready:\n%s", s.Logs())
	case <-time.After(60 * time.Second):
		t.Fatalf("nkp-provider serve sent no READY=1 within 60 s:\n%s", s.Logs())
	}
	return s, ln
}

// notification is the next sd_notify message s sent after the ones already read.
func (s *server) notification(t *testing.T) string {
	t.Helper()
	select {
	case n := <-s.notes:
		return n
	case <-time.After(30 * time.Second):
		t.Fatalf("no sd_notify message within 30 s:\n%s", s.Logs())
		return ""
	}
}

// Logs is everything the server logged so far.
func (s *server) Logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logs.String()
}

func (s *server) kill() {
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Kill()
	<-s.done
}

// stop sends SIGTERM and waits for a clean exit.
func (s *server) stop(t *testing.T) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("nkp-provider did not stop within 30 s of SIGTERM:\n%s", s.Logs())
	}
	if code := s.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("nkp-provider exited %d after SIGTERM:\n%s", code, s.Logs())
	}
}

// ctl runs nkpctl provider ARGS against s (its dir and URL) and returns stdout; stderr
// is part of the error.
func (b bins) ctl(t *testing.T, dir, url string, stdin string, args ...string) (string, error) {
	t.Helper()
	full := append([]string{"provider", "--dir", dir}, args...)
	if url != "" {
		full = append(full, "--provider", url)
	}
	cmd := exec.Command(b.nkpctl, full...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("nkpctl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (b bins) mustCtl(t *testing.T, dir, url, stdin string, args ...string) string {
	t.Helper()
	out, err := b.ctl(t, dir, url, stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ctlJSON runs nkpctl with --json and decodes stdout into v.
func (b bins) ctlJSON(t *testing.T, dir, url string, v any, args ...string) {
	t.Helper()
	out := b.mustCtl(t, dir, url, "", append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("nkpctl %v --json: %v in %q", args, err, out)
	}
}

func (b bins) initProvider(t *testing.T, extra ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "provider")
	cmd := exec.Command(b.provider, append([]string{"init", "--dir", dir, "--log-format", "text"}, extra...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nkp-provider init: %v\n%s", err, out)
	}
	return dir
}

// host is a simulated host: an enrolled in-process client.
type host struct {
	id  string
	enr *client.Enrollment
	c   *client.Client
}

// clientFor is a client with h's identity for another replica.
func (h *host) clientFor(t *testing.T, url string) *client.Client {
	t.Helper()
	c, err := client.New(client.Config{URL: url, CA: h.enr.CA, Certificate: h.enr.Certificate, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// token creates a join token through nkpctl.
func (b bins) token(t *testing.T, s *server, ttl string) apiv1.Token {
	t.Helper()
	var tok apiv1.Token
	b.ctlJSON(t, s.dir, s.url, &tok, "token", "create", "--ttl", ttl)
	if tok.Secret == "" || !strings.HasPrefix(tok.CAHash, "sha256:") {
		t.Fatalf("token create printed %+v", tok)
	}
	return tok
}

func join(t *testing.T, url string, tok apiv1.Token, name string, ek []byte) (*host, error) {
	t.Helper()
	enr, err := client.Join(context.Background(), client.JoinRequest{URL: url, Token: tok.Secret, CAHash: tok.CAHash,
		Hostname: name, Key: newKey(t), EKPublic: ek})
	if err != nil {
		return nil, err
	}
	c, err := client.New(client.Config{URL: url, CA: enr.CA, Certificate: enr.Certificate})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return &host{id: enr.HostID, enr: enr, c: c}, nil
}

func (b bins) mustJoin(t *testing.T, s *server, name string) *host {
	t.Helper()
	h, err := join(t, s.url, b.token(t, s, "10m"), name, nil)
	if err != nil {
		t.Fatalf("join %s: %v", name, err)
	}
	return h
}

func writeFile(t *testing.T, path, data string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// rawGet sends a GET without a client certificate, trusting the CA in caFile.
func rawGet(t *testing.T, url, caFile string) (int, string) {
	t.Helper()
	ca, err := daemon.LoadCACert(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			_, err = leaf.Verify(x509.VerifyOptions{Roots: roots})
			return err
		},
	}}}
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func newUUID(t *testing.T) string {
	t.Helper()
	return uuid.NewString()
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func listenNotify(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// running initialises a provider in a new directory and serves it; extra goes to both.
func (b bins) running(t *testing.T, extra ...string) (string, *server) {
	t.Helper()
	dir := b.initProvider(t, extra...)
	return dir, b.serve(t, dir, extra...)
}

// etcdStoreArgs are the flags that put a provider's store in etcd.
func etcdStoreArgs(etcd *etcdtest.Cluster) []string {
	return []string{"--store", "etcd", "--etcd-endpoints", strings.Join(etcd.Endpoints(), ",")}
}

// backUp takes a backup through the provider at url with the admin in dir (passphrase
// "pw: correct horse battery", archive in a temporary directory), so that it may release keys.
func (b bins) backUp(t *testing.T, dir, url string) {
	t.Helper()
	b.mustCtl(t, dir, url, "", "backup", "--passphrase-file", writeFile(t, filepath.Join(t.TempDir(), "p"), "pw: correct horse battery"), "--out", filepath.Join(t.TempDir(), "b.age"))
}

// replicaPair is two nkp-provider replicas on one etcd with the same root key and
// admin credentials.
type replicaPair struct {
	dirA, dirB string  // their directories
	a, b       *server // the running replicas
}

// replicas initialises a provider on a fresh etcd and serves it from two replicas.
func (b bins) replicas(t *testing.T) replicaPair {
	t.Helper()
	storeArgs := etcdStoreArgs(etcdtest.New(t, etcdtest.Config{}))
	p := replicaPair{dirA: b.initProvider(t, storeArgs...), dirB: filepath.Join(t.TempDir(), "replica-b")}
	copyReplicaFiles(t, p.dirA, p.dirB)
	p.a = b.serve(t, p.dirA, storeArgs...)
	p.b = b.serve(t, p.dirB, storeArgs...)
	return p
}
