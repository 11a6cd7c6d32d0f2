package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/hooks"
	"github.com/nkp-dev/nkp/hooks/hookproto"
	"github.com/nkp-dev/nkp/internal/schedslice"
)

// FuzzHasNamespace checks the entry's byte search against hookproto.Protected, which
// hooks.Main uses: they must agree on every input, or a protected domain could take the
// fast path.
func FuzzHasNamespace(f *testing.F) {
	ns := hookproto.Namespace
	for _, s := range []string{"", "h", ns, ns[:len(ns)-1], "x" + ns, ns + "x", "https://nkp.dev/ns/vm/2" + ns[1:], strings.Repeat("https://nkp.dev/ns/vm/", 3) + "1"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := hasNamespace(b), hookproto.Protected(b); got != want {
			t.Fatalf("hasNamespace(%q) = %v, hookproto.Protected says %v", b, got, want)
		}
	})
}

// TestEntry builds nkp-hook with and without its entry point and runs both on the same
// inputs: they must exit with the same status and print the same sentences, and the
// entry must answer a domain that is not nkp's without starting the Go runtime (with
// GODEBUG=inittrace=1 the runtime prints a line per package it initialises).
func TestEntry(t *testing.T) {
	dir := t.TempDir()
	withEntry, plain := buildBoth(t, dir, "")
	conf := filepath.Join(dir, "hook.conf")
	if err := os.WriteFile(conf, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	plainXML := "<domain type='kvm'><name>web</name><devices/></domain>"
	protXML := `<domain type='kvm'><name>db</name><metadata><nkp:vm xmlns:nkp="` + hookproto.Namespace + `"><nkp:object name="vtpm" key-id="k-123"/></nkp:vm></metadata></domain>`
	pad := func(n int) string { return "<!--" + strings.Repeat("x", n-7) + "-->" }
	ns := hookproto.Namespace
	args := []string{"db", "prepare", "begin", "-"}
	tests := []struct {
		name    string
		stdin   []string // written in these chunks, a pause between them; nil: /dev/null
		dir     bool     // stdin is a directory (read fails)
		args    []string
		status  int
		runtime bool // the Go runtime must start (else it must not)
	}{
		{name: "plain", stdin: []string{plainXML}, args: args},
		{name: "plain in chunks", stdin: []string{plainXML[:10], plainXML[10:20], plainXML[20:]}, args: args},
		{name: "empty", stdin: []string{""}, args: args},
		{name: "plain, wrong arguments", stdin: []string{plainXML}, args: []string{"x"}},
		{name: "protected, no hostd", stdin: []string{protXML}, args: args, status: 1, runtime: true},
		{name: "protected, released", stdin: []string{protXML}, args: []string{"db", "release", "end", "-"}, runtime: true},
		{name: "protected in chunks", stdin: []string{protXML[:60], protXML[60:80], protXML[80:]}, args: args, status: 1, runtime: true},
		{name: "namespace split across the first MiB", stdin: []string{pad(prefixSize-10) + ns + plainXML}, args: args, status: 1, runtime: true},
		{name: "namespace past the first MiB", stdin: []string{pad(prefixSize+100) + protXML}, args: args, status: 1, runtime: true},
		{name: "plain of exactly 1 MiB", stdin: []string{plainXML + pad(prefixSize-len(plainXML))}, args: args, runtime: true},
		{name: "plain over 1 MiB", stdin: []string{plainXML + pad(prefixSize+1)}, args: args, runtime: true},
		{name: "stdin a directory", dir: true, args: args, status: 1, runtime: true},
		{name: "stdin a directory, stopped", dir: true, args: []string{"db", "stopped", "end", "-"}, runtime: true},
		{name: "stdin /dev/null", args: args},
	}
	run := func(t *testing.T, bin string, tc int) (int, string, bool) {
		tt := tests[tc]
		cmd := exec.Command(bin, tt.args...)
		cmd.Env = []string{"GODEBUG=inittrace=1", "NKP_HOOK_CONFIG=" + conf, "NKP_HOOK_SOCKET=" + filepath.Join(dir, "none.sock"), "NKP_HOOK_TIMEOUT=2s"}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		var w *os.File
		switch {
		case tt.dir:
			d, err := os.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			cmd.Stdin = d
		case tt.stdin != nil:
			r, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			cmd.Stdin, w = r, pw
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if w != nil {
			for i, c := range tt.stdin {
				if i > 0 {
					time.Sleep(20 * time.Millisecond)
				}
				w.WriteString(c) // an early exit closes the pipe: EPIPE is fine
			}
			w.Close()
		}
		err := cmd.Wait()
		status := cmd.ProcessState.ExitCode()
		if status < 0 {
			t.Fatalf("%s: %v\n%s", bin, err, stderr.String())
		}
		var lines []string
		started := false
		for _, l := range strings.Split(stderr.String(), "\n") {
			if strings.HasPrefix(l, "init ") {
				started = true
			} else if l != "" {
				lines = append(lines, l)
			}
		}
		return status, strings.Join(lines, "\n"), started
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, msg, started := run(t, withEntry, i)
			pStatus, pMsg, _ := run(t, plain, i)
			if status != tt.status || pStatus != tt.status {
				t.Errorf("exit status %d with the entry, %d without, want %d\n%s\n%s", status, pStatus, tt.status, msg, pMsg)
			}
			if msg != pMsg {
				t.Errorf("stderr with the entry:\n%s\nwithout:\n%s", msg, pMsg)
			}
			if tt.status == 1 && !strings.Contains(msg, "db") {
				t.Errorf("refusal does not name the VM:\n%s", msg)
			}
			if started != tt.runtime {
				t.Errorf("Go runtime started: %v, want %v", started, tt.runtime)
			}
		})
	}
}

// TestEntryHostd runs nkp-hook built with and without its entry point against a hostd
// stand-in on a socket, with the defaults pointed at it by -ldflags=-X (the entry only
// asks hostd when nothing else configures the hook): both builds must exit with the same
// status and print the same sentences; hostd must get the request once, byte for byte
// what hooks sends; and the entry must answer an allow without a message without
// starting the Go runtime, and leave everything else to it.
func TestEntryHostd(t *testing.T) {
	dir := t.TempDir()
	sock, conf := filepath.Join(dir, "hostd.sock"), filepath.Join(dir, "hook.conf")
	const required, optional = 1500 * time.Millisecond, 700 * time.Millisecond
	x := fmt.Sprintf("-X main.hookSocket=%s -X main.hookConfig=%s -X main.requiredTimeoutMs=%d -X main.optionalTimeoutMs=%d",
		sock, conf, required.Milliseconds(), optional.Milliseconds())
	withEntry, plain := buildBoth(t, dir, x)
	protXML := `<domain type='kvm'><name>db</name><metadata><nkp:vm xmlns:nkp="` + hookproto.Namespace + `"><nkp:object name="vtpm" key-id="k-123"/></nkp:vm></metadata></domain>`
	big := strings.Replace(protXML, "</domain>", "<!--"+strings.Repeat("x", 900<<10)+"--></domain>", 1) // more than a socket buffer
	msg := func(allow bool, m string) string {
		b, err := hookproto.AppendReply2(nil, hookproto.Reply{Allow: allow, Message: m})
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	var v1Allow bytes.Buffer
	hookproto.WriteReply(&v1Allow, hookproto.Reply{Version: hookproto.Version, Allow: true})
	prepare, release := []string{"db", "prepare", "begin", "-"}, []string{"db", "release", "end", "-"}
	const (
		down  = iota // no socket
		stale        // a socket file nobody listens on
		serve        // answer with reply (after the request)
		hang         // read the request, never answer
		shut         // close each connection at once
	)
	tests := []struct {
		name    string
		hostd   int
		reply   string
		args    []string
		xml     string // protXML if empty
		env     []string
		conf    bool // the config file exists (empty)
		status  int
		want    string // in stderr ("" : stderr empty)
		runtime bool   // the Go runtime must start (else it must not)
		asked   bool   // hostd must get the request (once)
		atLeast time.Duration
	}{
		{name: "allowed", hostd: serve, reply: hookproto.ReplyAllow, args: prepare, asked: true},
		{name: "allowed, release", hostd: serve, reply: hookproto.ReplyAllow, args: release, asked: true},
		{name: "allowed, unknown operation", hostd: serve, reply: hookproto.ReplyAllow, args: []string{"db", "teleport", "-", "-"}, asked: true},
		{name: "allowed with a warning", hostd: serve, reply: msg(true, "nkp: warning: provider unreachable"), args: prepare, want: "provider unreachable", runtime: true, asked: true},
		{name: "refused", hostd: serve, reply: msg(false, `nkp: VM "db" (vTPM key k-123): KDK version 9 is unknown`), args: prepare, status: 1, want: "KDK version 9", runtime: true, asked: true},
		{name: "refused, release", hostd: serve, reply: msg(false, `nkp: VM "db": no`), args: release, status: 1, want: "no", runtime: true, asked: true},
		{name: "JSON reply (hostd of the last release)", hostd: serve, reply: v1Allow.String(), args: prepare, runtime: true, asked: true},
		{name: "garbled reply", hostd: serve, reply: "HTTP/1.1 400 Bad Request\r\n", args: prepare, status: 1, want: "cannot start", runtime: true, asked: true},
		{name: "garbled reply, release", hostd: serve, reply: "nkph\x02\x07\x00\x00\x00\x00", args: release, want: "warning", runtime: true, asked: true},
		{name: "short reply", hostd: serve, reply: hookproto.ReplyAllow[:7], args: prepare, status: 1, want: "truncated", runtime: true, asked: true},
		{name: "no reply", hostd: serve, args: prepare, status: 1, want: "closed before a message", runtime: true, asked: true},
		{name: "allow and more", hostd: serve, reply: hookproto.ReplyAllow + "trailing", args: prepare, asked: true},
		{name: "hostd down", hostd: down, args: prepare, status: 1, want: "start nkp-hostd", runtime: true},
		{name: "hostd down, unknown operation", hostd: down, args: []string{"db", "teleport", "-", "-"}, status: 1, want: "teleport", runtime: true},
		{name: "hostd down, release", hostd: down, args: release, want: "warning", runtime: true},
		{name: "stale socket", hostd: stale, args: prepare, status: 1, want: "connection refused", runtime: true},
		{name: "hostd closes before reading", hostd: shut, args: prepare, xml: big, status: 1, want: "sending the request", runtime: true},
		{name: "hostd never answers", hostd: hang, args: prepare, status: 1, want: "time limit", runtime: true, asked: true, atLeast: required},
		{name: "hostd never answers, release", hostd: hang, args: release, want: "time limit", runtime: true, asked: true, atLeast: optional},
		// Configured otherwise, or input the entry leaves to Go: Go asks.
		{name: "NKP_HOOK_TIMEOUT set", hostd: serve, reply: hookproto.ReplyAllow, args: prepare, env: []string{"NKP_HOOK_TIMEOUT=10s"}, runtime: true, asked: true},
		{name: "config file", hostd: serve, reply: hookproto.ReplyAllow, args: prepare, conf: true, runtime: true, asked: true},
		{name: "flag", hostd: serve, reply: hookproto.ReplyAllow, args: append([]string{"--timeout=10s"}, prepare...), runtime: true, asked: true},
		{name: "XML not ASCII", hostd: serve, reply: hookproto.ReplyAllow, args: prepare, xml: strings.Replace(protXML, "db<", "dé<", 1), runtime: true, asked: true},
		{name: "domain not ASCII", hostd: serve, reply: hookproto.ReplyAllow, args: []string{"dé", "prepare", "begin", "-"}, runtime: true, asked: true},
		{name: "domain with a control character", hostd: serve, reply: hookproto.ReplyAllow, args: []string{"d\tb", "prepare", "begin", "-"}, status: 1, want: "control characters", runtime: true},
		{name: "three arguments", hostd: serve, reply: hookproto.ReplyAllow, args: prepare[:3], status: 1, want: "4 arguments", runtime: true},
		{name: "empty sub-operation", hostd: serve, reply: hookproto.ReplyAllow, args: []string{"db", "prepare", "", "-"}, asked: true},
	}
	type result struct {
		status  int
		stderr  string
		runtime bool
		raw     [][]byte // requests hostd got
		slices  []time.Duration
		took    time.Duration
	}
	run := func(t *testing.T, bin string, i int) result {
		tt := tests[i]
		os.Remove(sock)
		os.Remove(conf)
		if tt.conf {
			os.WriteFile(conf, nil, 0o600)
		}
		var (
			mu     sync.Mutex
			raw    [][]byte
			slices []time.Duration // the hook's threads' time slices while it waited
			wg     sync.WaitGroup
		)
		done := make(chan struct{})
		stop := func() {}
		switch tt.hostd {
		case stale:
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		case serve, hang, shut:
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			stop = func() {
				close(done)
				l.Close()
				wg.Wait()
			}
			defer func() { stop() }()
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					if tt.hostd == shut {
						c.Close()
						continue
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						defer c.Close()
						var got bytes.Buffer
						c.SetDeadline(time.Now().Add(time.Minute))
						_, _, err := hookproto.ReadRequestAny(bufio.NewReader(io.TeeReader(c, &got)))
						if got.Len() == 0 {
							return // connected, sent nothing (hooks refuses an invalid request itself)
						}
						if err != nil {
							t.Errorf("hostd: %v", err)
						}
						sl := peerSlices(t, c)
						mu.Lock()
						raw = append(raw, got.Bytes())
						slices = append(slices, sl...)
						mu.Unlock()
						if tt.hostd == hang {
							<-done
							return
						}
						c.Write([]byte(tt.reply))
					}()
				}
			}()
		}
		xml := tt.xml
		if xml == "" {
			xml = protXML
		}
		cmd := exec.Command(bin, tt.args...)
		cmd.Env = append([]string{"GODEBUG=inittrace=1"}, tt.env...)
		cmd.Stdin = strings.NewReader(xml)
		var stderr, stdout bytes.Buffer
		cmd.Stderr, cmd.Stdout = &stderr, &stdout
		start := time.Now()
		err := cmd.Run()
		r := result{took: time.Since(start), status: cmd.ProcessState.ExitCode()}
		if r.status < 0 {
			t.Fatalf("%s: %v\n%s", bin, err, stderr.String())
		}
		if stdout.Len() != 0 {
			t.Errorf("%s wrote %q on stdout", bin, stdout.String())
		}
		var lines []string
		for _, l := range strings.Split(stderr.String(), "\n") {
			if strings.HasPrefix(l, "init ") {
				r.runtime = true
			} else if l != "" {
				lines = append(lines, l)
			}
		}
		r.stderr = strings.Join(lines, "\n")
		stop()
		stop = func() {}
		mu.Lock()
		r.raw, r.slices = raw, slices
		mu.Unlock()
		return r
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, p := run(t, withEntry, i), run(t, plain, i)
			if e.status != tt.status || p.status != tt.status {
				t.Errorf("exit status %d with the entry, %d without, want %d\n%s\n%s", e.status, p.status, tt.status, e.stderr, p.stderr)
			}
			if e.stderr != p.stderr {
				t.Errorf("stderr with the entry:\n%s\nwithout:\n%s", e.stderr, p.stderr)
			}
			if tt.want == "" && e.stderr != "" || !strings.Contains(e.stderr, tt.want) {
				t.Errorf("stderr %q, want %q", e.stderr, tt.want)
			}
			if tt.status == 1 && !strings.Contains(e.stderr, "db") && !strings.Contains(e.stderr, "d\\tb") {
				t.Errorf("refusal does not name the VM:\n%s", e.stderr)
			}
			if e.runtime != tt.runtime {
				t.Errorf("Go runtime started: %v, want %v", e.runtime, tt.runtime)
			}
			for name, r := range map[string]result{"with the entry": e, "without": p} {
				want := 0
				if tt.asked {
					want = 1
				}
				if len(r.raw) != want {
					t.Fatalf("%s: hostd got %d requests, want %d", name, len(r.raw), want)
				}
				// While it waits for hostd, every thread of the hook has the short time slice
				// (kernels from 6.12; older ones report none).
				for _, sl := range r.slices {
					if sl != schedslice.Short && shortSlices {
						t.Errorf("%s: a thread of the hook had a time slice of %v while it asked, want %v", name, sl, schedslice.Short)
					}
				}
				if tt.asked && len(r.slices) == 0 {
					t.Errorf("%s: no thread's time slice read", name)
				}
				if tt.atLeast > 0 && (r.took < tt.atLeast || r.took > tt.atLeast+10*time.Second) {
					t.Errorf("%s: took %v, want the timeout %v or a little more", name, r.took, tt.atLeast)
				}
			}
			if tt.asked {
				if !bytes.Equal(e.raw[0], p.raw[0]) {
					t.Errorf("request with the entry:\n%q\nwithout:\n%q", e.raw[0], p.raw[0])
				}
				a := tt.args[len(tt.args)-4:]
				xml := tt.xml
				if xml == "" {
					xml = protXML
				}
				want, err := hookproto.AppendRequest2(nil, hookproto.Request{Domain: a[0], Op: a[1], SubOp: a[2], Extra: a[3], XML: xml})
				if err != nil || !bytes.Equal(e.raw[0], want) {
					t.Errorf("request %q, want %q (%v)", e.raw[0], want, err)
				}
			}
		})
	}
}

// shortSlices: this kernel takes a time slice per task (Linux 6.12 and later).
var shortSlices = func() bool {
	d, err := schedslice.Of(0)
	return err == nil && d != 0
}()

// peerSlices returns the time slices of the threads of the process at the other end of c.
func peerSlices(t *testing.T, c net.Conn) []time.Duration {
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Error(err)
		return nil
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if err != nil {
		t.Error(err)
		return nil
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", cred.Pid))
	if err != nil {
		t.Error(err)
		return nil
	}
	var out []time.Duration
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		if d, err := schedslice.Of(tid); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// TestLinkDefaults: the defaults laid out for the entry are hooks' and hookproto's.
func TestLinkDefaults(t *testing.T) {
	for _, op := range []string{hookproto.OpPrepare, hookproto.OpStart, hookproto.OpStarted, hookproto.OpStopped, hookproto.OpRelease,
		hookproto.OpMigrate, hookproto.OpRestore, hookproto.OpReconnect, hookproto.OpAttach, "teleport", "", "start\x00ed"} {
		if got := strings.Contains("\x00"+optionalOps, "\x00"+op+"\x00"); got != !hookproto.Required(op) {
			t.Errorf("optionalOps has %q: %v, but hookproto.Required says %v", op, got, hookproto.Required(op))
		}
	}
	o := options()
	if o.Socket != hooks.DefaultSocket || o.Config != hooks.DefaultConfig || o.Timeout != hooks.DefaultTimeout || o.OptionalTimeout != hooks.OptionalTimeout || o.Sent != nil {
		t.Errorf("options() = %+v, want hooks' defaults", o)
	}
}

// buildBoth builds nkp-hook into dir twice with the extra linker flags ldflags: with its
// assembly entry point (-E=main.entry) and plain, and returns both paths. It skips the
// test in -short mode or without a go tool.
func buildBoth(t *testing.T, dir, ldflags string) (withEntry, plain string) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds nkp-hook twice")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool to build nkp-hook with")
	}
	withEntry, plain = filepath.Join(dir, "nkp-hook-entry"), filepath.Join(dir, "nkp-hook-plain")
	for bin, flags := range map[string]string{withEntry: strings.TrimSpace("-E=main.entry " + ldflags), plain: ldflags} {
		args := []string{"build"}
		if flags != "" {
			args = append(args, "-ldflags="+flags)
		}
		cmd := exec.Command(goTool, append(args, "-o", bin, ".")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build -ldflags=%q: %v\n%s", flags, err, out)
		}
	}
	return withEntry, plain
}
