package hooks

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
)

const protectedXML = `<domain type='qemu'><name>vm1</name><uuid>6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b</uuid>
<metadata><nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1" provider="p1"><nkp:object name="disk:vda" key-id="11111111-2222-4333-8444-555555555555" kdk-id="a" kdk-version="1"/><nkp:object name="vtpm" key-id="0f8fad5b-d9cb-469f-a165-70867728950e" kdk-id="a" kdk-version="1"/></nkp:vm></metadata></domain>`

const plainXML = `<domain type='qemu'><name>plain</name><devices/></domain>`

// server answers hook requests like hostd would, recording what it got.
type server struct {
	path  string
	mu    sync.Mutex
	got   []hookproto.Request
	reply func(hookproto.Request) hookproto.Reply
	done  chan struct{}
}

func startServer(t *testing.T, reply func(hookproto.Request) hookproto.Reply) *server {
	t.Helper()
	s := &server{path: filepath.Join(t.TempDir(), "hook.sock"), reply: reply, done: make(chan struct{})}
	t.Cleanup(func() { close(s.done) })
	l, err := net.Listen("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, framing, err := hookproto.ReadRequestAny(bufio.NewReader(c))
				if err != nil {
					return
				}
				s.mu.Lock()
				s.got = append(s.got, req)
				s.mu.Unlock()
				if s.reply == nil { // hang: hold the connection until the test ends
					<-s.done
					return
				}
				hookproto.WriteReplyIn(c, framing, s.reply(req))
			}()
		}
	}()
	return s
}

func (s *server) requests() []hookproto.Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.got)
}

func env(m map[string]string) Env { return func(k string) string { return m[k] } }

func TestMain_(t *testing.T) {
	allow := func(hookproto.Request) hookproto.Reply { return hookproto.Reply{Version: 1, Allow: true} }
	refuse := func(r hookproto.Request) hookproto.Reply {
		return hookproto.Reply{Version: 1, Message: "nkp: VM " + r.Domain + ": KDK version 9 is unknown"}
	}
	warn := func(hookproto.Request) hookproto.Reply {
		return hookproto.Reply{Version: 1, Allow: true, Message: "nkp: provider unreachable, using the cached KDK"}
	}
	absent := filepath.Join(t.TempDir(), "no.sock")
	tests := []struct {
		name      string
		reply     func(hookproto.Request) hookproto.Reply // nil server: hostd absent
		hang      bool                                    // server reads but never answers
		args      []string
		xml       string
		readErr   bool // stdin fails after xml
		wantCode  int
		wantErr   []string // substrings of stderr; nil: stderr empty
		forwarded bool
	}{
		{name: "plain domain, hostd absent", args: []string{"plain", "prepare", "begin", "-"}, xml: plainXML, wantCode: 0},
		{name: "plain domain, garbage args", args: []string{"--weird"}, xml: plainXML, wantCode: 0},
		{name: "garbage stdin", args: []string{"x", "prepare", "begin", "-"}, xml: "\x00\xff<<<", wantCode: 0},
		{name: "empty stdin", args: []string{"x", "prepare", "begin", "-"}, xml: "", wantCode: 0},
		{name: "protected, allowed", reply: allow, args: []string{"vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 0, forwarded: true},
		{name: "protected, allowed with warning", reply: warn, args: []string{"vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 0, wantErr: []string{"cached KDK"}, forwarded: true},
		{name: "protected, refused", reply: refuse, args: []string{"vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"VM vm1: KDK version 9"}, forwarded: true},
		{name: "protected, unknown op, refused", reply: refuse, args: []string{"vm1", "frobnicate", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"KDK version 9"}, forwarded: true},
		{name: "hostd absent, prepare", args: []string{"vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 1,
			wantErr: []string{`VM "vm1"`, "0f8fad5b-d9cb-469f-a165-70867728950e", "cannot start", "start nkp-hostd"}},
		{name: "hostd absent, restore", args: []string{"vm1", "restore", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"cannot be restored"}},
		{name: "hostd absent, migrate", args: []string{"vm1", "migrate", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"cannot migrate in"}},
		{name: "hostd absent, unknown op", args: []string{"vm1", "frobnicate", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"frobnicate"}},
		{name: "hostd absent, release", args: []string{"vm1", "release", "end", "-"}, xml: protectedXML, wantCode: 0, wantErr: []string{"warning", "reconcile"}},
		{name: "hostd absent, reconnect", args: []string{"vm1", "reconnect", "begin", "-"}, xml: protectedXML, wantCode: 0, wantErr: []string{"warning"}},
		{name: "hostd hangs, prepare", hang: true, args: []string{"--timeout=200ms", "vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"time limit", "start nkp-hostd"}, forwarded: true},
		{name: "protected past the size limit, refused", reply: allow, args: []string{"vm1", "prepare", "begin", "-"}, xml: "<domain>" + strings.Repeat(" ", hookproto.MaxRequest-5) + protectedXML[8:], wantCode: 1, wantErr: []string{`VM "vm1"`, "larger than the 8388608 bytes"}},
		{name: "protected across the size limit, refused", reply: allow, args: []string{"vm1", "prepare", "begin", "-"}, xml: "<domain>" + strings.Repeat(" ", hookproto.MaxRequest-strings.Index(protectedXML, hookproto.Namespace)-len(hookproto.Namespace)/2) + protectedXML[8:], wantCode: 1, wantErr: []string{"larger than the 8388608 bytes"}},
		{name: "plain past the size limit", args: []string{"plain", "prepare", "begin", "-"}, xml: "<domain>" + strings.Repeat(" ", hookproto.MaxRequest) + plainXML[8:], wantCode: 0},
		{name: "stdin fails early, prepare: refused", reply: allow, args: []string{"x", "prepare", "begin", "-"}, xml: "<domain type='qemu'><name>x</name>", readErr: true, wantCode: 1,
			wantErr: []string{`VM "x"`, "could not read its domain XML", "cannot tell whether nkp protects", "refuses to start", "broken pipe"}},
		{name: "stdin fails early, unknown op: refused", args: []string{"x", "frobnicate", "begin", "-"}, xml: "<domain>", readErr: true, wantCode: 1, wantErr: []string{"cannot tell"}},
		{name: "stdin fails early, release: passes with a warning", args: []string{"x", "release", "end", "-"}, xml: "<domain>", readErr: true, wantCode: 0, wantErr: []string{"warning", "could not read"}},
		{name: "stdin fails after a whole plain domain", args: []string{"plain", "prepare", "begin", "-"}, xml: plainXML, readErr: true, wantCode: 0},
		{name: "stdin fails after nkp's namespace", reply: allow, args: []string{"vm1", "prepare", "begin", "-"}, xml: protectedXML[:300], readErr: true, wantCode: 1, wantErr: []string{`VM "vm1"`, "reading the domain XML"}},
		{name: "protected, wrong arg count", reply: allow, args: []string{"vm1", "prepare"}, xml: protectedXML, wantCode: 1, wantErr: []string{"4 arguments", "0f8fad5b"}},
		{name: "protected, bad flag", reply: allow, args: []string{"--sockets=x", "vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{"unknown flag --sockets"}},
		{name: "protected, bad timeout", reply: allow, args: []string{"--timeout=soon", "vm1", "prepare", "begin", "-"}, xml: protectedXML, wantCode: 1, wantErr: []string{`timeout "soon"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := absent
			var srv *server
			if tt.reply != nil || tt.hang {
				srv = startServer(t, tt.reply)
				sock = srv.path
			}
			var stderr bytes.Buffer
			var stdin io.Reader = strings.NewReader(tt.xml)
			if tt.readErr {
				stdin = io.MultiReader(stdin, iotest.ErrReader(syscall.EPIPE))
			}
			code := Main(tt.args, stdin, &stderr, env(map[string]string{
				"NKP_HOOK_SOCKET": sock, "NKP_HOOK_CONFIG": os.DevNull,
			}))
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d (stderr %q)", code, tt.wantCode, stderr.String())
			}
			if tt.wantErr == nil && stderr.Len() != 0 {
				t.Errorf("stderr %q, want none", stderr.String())
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr %q lacks %q", stderr.String(), w)
				}
			}
			if srv != nil {
				got := srv.requests()
				if tt.forwarded != (len(got) == 1) {
					t.Fatalf("hostd got %d requests, forwarded = %v", len(got), tt.forwarded)
				}
				if tt.forwarded {
					a := tt.args[len(tt.args)-4:]
					want := hookproto.Request{Version: hookproto.Version2, Domain: a[0], Op: a[1], SubOp: a[2], Extra: a[3], XML: tt.xml}
					if got[0] != want {
						t.Errorf("hostd got %+v, want %+v", got[0], want)
					}
				}
			}
		})
	}
}

func TestConfigure(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "hook.conf")
	os.WriteFile(conf, []byte("# test\nsocket = /run/a/hook.sock\ntimeout = 7s\n"), 0o644)
	bad := filepath.Join(dir, "bad.conf")
	os.WriteFile(bad, []byte("sokcet = /x\n"), 0o644)
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		want    Config
		wantErr string
	}{
		{"defaults (no file)", nil, map[string]string{"NKP_HOOK_CONFIG": ""}, Config{DefaultSocket, DefaultTimeout}, ""},
		{"file", nil, map[string]string{"NKP_HOOK_CONFIG": conf}, Config{"/run/a/hook.sock", 7 * time.Second}, ""},
		{"env over file", nil, map[string]string{"NKP_HOOK_CONFIG": conf, "NKP_HOOK_SOCKET": "/e"}, Config{"/e", 7 * time.Second}, ""},
		{"flag over env", []string{"--socket=/f", "--timeout=1s"}, map[string]string{"NKP_HOOK_CONFIG": conf, "NKP_HOOK_SOCKET": "/e"}, Config{"/f", time.Second}, ""},
		{"config flag", []string{"--config=" + conf}, nil, Config{"/run/a/hook.sock", 7 * time.Second}, ""},
		{"missing explicit file", []string{"--config=" + dir + "/none"}, nil, Config{}, "no such file"},
		{"typo in file", []string{"--config=" + bad}, nil, Config{}, "line 1"},
		{"negative timeout", []string{"--config=" + conf, "--timeout=-1s"}, nil, Config{}, "positive duration"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append(tt.args, "d", "prepare", "begin", "-")
			got, pos, err := configure(args, env(tt.env), Options{}.withDefaults())
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.name == "defaults (no file)" {
				// /etc/nkp/hook.conf may exist on a test machine; only check when it does not.
				if _, err := os.Stat(DefaultConfig); err == nil {
					t.Skip(DefaultConfig + " exists here")
				}
			}
			if got != tt.want || len(pos) != 4 {
				t.Errorf("got %+v %q, want %+v", got, pos, tt.want)
			}
		})
	}
}

func TestKeyID(t *testing.T) {
	tests := []struct{ xml, want string }{
		{protectedXML, "0f8fad5b-d9cb-469f-a165-70867728950e"},
		{`<d xmlns:n="https://nkp.dev/ns/vm/1"><n:disk key-id="k1"/></d>`, "k1"},
		{`<d xmlns:n="https://nkp.dev/ns/vm/1"><n:vm/></d>`, "(unknown)"},
		{`<d><disk key-id="not-ours"/> https://nkp.dev/ns/vm/1</d>`, "(unknown)"},
		{`<d xmlns:n="https://nkp.dev/ns/vm/1"><n:vtpm key-id="a&#10;b"/></d>`, "a?b"},
		{`<d xmlns:n="https://nkp.dev/ns/vm/1"><n:object name="disk:vda" key-id="d1"/><n:object name="vtpm" key-id="t1"/></d>`, "t1"},
	}
	for _, tt := range tests {
		if got := keyID([]byte(tt.xml)); got != tt.want {
			t.Errorf("keyID(%q) = %q, want %q", tt.xml, got, tt.want)
		}
	}
}

// TestBinaryFastPath runs the built hook as libvirtd does and checks the time a domain
// without nkp metadata costs, with hostd absent.
func TestBinaryFastPath(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/nkp-hook")
	}
	bin := filepath.Join(t.TempDir(), "nkp-hook")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/nkp-dev/nkp/cmd/nkp-hook").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	// The reference: a Go program that does nothing, so the bound is on what the hook adds
	// to the Go runtime's start.
	refDir := t.TempDir()
	os.WriteFile(filepath.Join(refDir, "go.mod"), []byte("module ref\ngo 1.26\n"), 0o644)
	os.WriteFile(filepath.Join(refDir, "main.go"), []byte("package main\n\nimport \"os\"\n\nfunc main() { os.Exit(0) }\n"), 0o644)
	ref := filepath.Join(refDir, "ref")
	build := exec.Command("go", "build", "-o", ref, ".")
	build.Dir = refDir
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build reference: %v\n%s", err, out)
	}
	// hostd "present" but hung: the fast path must not touch the socket at all.
	hung := startServer(t, nil)
	big := strings.Replace(plainXML, "<devices/>", "<devices>"+strings.Repeat("<disk type='file'><source file='/x'/></disk>", 500)+"</devices>", 1)
	type result struct {
		wall, cpu time.Duration
		code      int
		stderr    string
	}
	run := func(bin, sock, xml string, args ...string) result {
		cmd := exec.Command(bin, args...)
		cmd.Env = []string{"NKP_HOOK_SOCKET=" + sock, "NKP_HOOK_CONFIG=/dev/null", "NKP_HOOK_TIMEOUT=30s"}
		cmd.Stdin = strings.NewReader(xml)
		var stderr, stdout bytes.Buffer
		cmd.Stderr, cmd.Stdout = &stderr, &stdout
		start := time.Now()
		err := cmd.Run()
		r := result{wall: time.Since(start), stderr: stderr.String()}
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			r.code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		r.cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
		if stdout.Len() != 0 {
			t.Errorf("hook wrote %q on stdout (libvirt takes it as a new XML on migrate/restore)", stdout.String())
		}
		return r
	}
	// Interleaved with the reference: on a loaded machine the wall time of any process
	// start is mostly waiting for a CPU, so the bound is on the CPU time the hook adds to
	// an empty Go program; the wall times are logged beside the reference's.
	var hookWall, hookCPU, refWall, refCPU []time.Duration
	for range 30 {
		for _, xml := range []string{plainXML, big} {
			r := run(bin, hung.path, xml, "plain", "prepare", "begin", "-")
			if r.code != 0 || r.stderr != "" {
				t.Fatalf("plain domain: exit %d, stderr %q", r.code, r.stderr)
			}
			hookWall, hookCPU = append(hookWall, r.wall), append(hookCPU, r.cpu)
			r = run(ref, hung.path, "")
			refWall, refCPU = append(refWall, r.wall), append(refCPU, r.cpu)
		}
	}
	for _, s := range [][]time.Duration{hookWall, hookCPU, refWall, refCPU} {
		slices.Sort(s)
	}
	p := func(s []time.Duration, q int) time.Duration { return s[len(s)*q/100] }
	t.Logf("fast path, %d runs: wall p50 %v p90 %v, CPU p50 %v p90 %v; empty Go program: wall p50 %v p90 %v, CPU p50 %v p90 %v",
		len(hookWall), p(hookWall, 50), p(hookWall, 90), p(hookCPU, 50), p(hookCPU, 90), p(refWall, 50), p(refWall, 90), p(refCPU, 50), p(refCPU, 90))
	if added := p(hookCPU, 50) - p(refCPU, 50); added > 5*time.Millisecond {
		t.Errorf("fast path adds %v CPU at p50 to an empty Go program, want under 5 ms", added)
	}
	// Wall time on a shared machine is mostly waiting for a CPU (logged above); what it
	// must show is that the fast path never waits for hostd, which hangs here (a wait
	// would last the 30 s timeout).
	if max := hookWall[len(hookWall)-1]; max > 5*time.Second {
		t.Errorf("a fast-path run took %v: it waited for hostd", max)
	}
	r := run(bin, filepath.Join(t.TempDir(), "absent.sock"), protectedXML, "vm1", "prepare", "begin", "-")
	if r.code != 1 || !strings.Contains(r.stderr, "0f8fad5b-d9cb-469f-a165-70867728950e") {
		t.Errorf("protected with hostd absent: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestOldHostd: a hostd of the last release reads only version 1's framing and refuses
// anything else unread, as df441f2's serveHook did. The hook asks it again once in
// version 1's framing, so protected VMs keep starting between installing a release and
// restarting nkp-hostd; what the old hostd then answers decides, and nothing is sent a
// third time.
func TestOldHostd(t *testing.T) {
	tests := []struct {
		name     string
		allow    bool
		wantCode int
		wantErr  string
	}{
		{name: "allows", allow: true, wantCode: 0},
		{name: "refuses the VM", allow: false, wantCode: 1, wantErr: "KDK version 9 is unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "hook.sock")
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			var mu sync.Mutex
			var conns int
			var got []hookproto.Request
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					mu.Lock()
					conns++
					mu.Unlock()
					req, err := hookproto.ReadRequest(bufio.NewReader(c))
					if err != nil {
						hookproto.WriteReply(c, hookproto.Reply{Version: hookproto.Version, Message: "nkp: nkp-hostd could not read the hook's request (" + err.Error() + "): install nkp-hook and nkp-hostd from the same release"})
						c.Close()
						continue
					}
					mu.Lock()
					got = append(got, req)
					mu.Unlock()
					r := hookproto.Reply{Version: hookproto.Version, Allow: true}
					if !tt.allow {
						r = hookproto.Reply{Version: hookproto.Version, Message: "nkp: VM vm1: KDK version 9 is unknown"}
					}
					hookproto.WriteReply(c, r)
					c.Close()
				}
			}()
			var stderr bytes.Buffer
			code := Main([]string{"vm1", "prepare", "begin", "-"}, strings.NewReader(protectedXML), &stderr,
				env(map[string]string{"NKP_HOOK_SOCKET": path, "NKP_HOOK_CONFIG": os.DevNull}))
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d (stderr %q)", code, tt.wantCode, stderr.String())
			}
			if tt.wantErr == "" && stderr.Len() != 0 || !strings.Contains(stderr.String(), tt.wantErr) {
				t.Errorf("stderr %q, want %q", stderr.String(), tt.wantErr)
			}
			if strings.Contains(stderr.String(), "could not read") {
				t.Errorf("stderr %q shows the old hostd's refusal of the version 2 request", stderr.String())
			}
			mu.Lock()
			defer mu.Unlock()
			want := hookproto.Request{Version: hookproto.Version, Domain: "vm1", Op: "prepare", SubOp: "begin", Extra: "-", XML: protectedXML}
			if conns != 2 || len(got) != 1 || got[0] != want {
				t.Fatalf("old hostd: %d connections, read %+v; want 2 connections, the second the request in version 1's framing", conns, got)
			}
		})
	}
}
