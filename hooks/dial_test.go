package hooks

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
)

// fullListener is a unix listener with a backlog of 0 that never accepts, filled until a
// further connect would wait.
func fullListener(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "full.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		c, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Close(c) })
		err = syscall.Connect(c, &syscall.SockaddrUnix{Name: path})
		if errors.Is(err, syscall.EAGAIN) {
			return path
		}
		if err != nil || i > 100 {
			t.Fatalf("filling the backlog: connect %d: %v", i, err)
		}
	}
}

func TestAskBounded(t *testing.T) {
	req := hookproto.Request{Version: hookproto.Version, Domain: "vm1", Op: "prepare", SubOp: "begin", Extra: "-", XML: protectedXML}
	hung := startServer(t, nil) // reads the request, never answers
	allow := startServer(t, func(hookproto.Request) hookproto.Reply { return hookproto.Reply{Version: 1, Allow: true} })
	tests := []struct {
		name    string
		socket  string
		xml     string // "" = protectedXML
		ctx     func() (context.Context, context.CancelFunc)
		wantErr string // "" = allowed
		atLeast time.Duration
	}{
		{name: "answered", socket: allow.path, ctx: func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 10*time.Second)
		}},
		{name: "a 4 MiB domain XML, written in pieces", socket: allow.path, xml: "<domain>" + strings.Repeat("a", 4<<20) + protectedXML[8:],
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 60*time.Second)
			}},
		{name: "no deadline: DefaultTimeout", socket: allow.path, ctx: func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }},
		{name: "no answer within the deadline", socket: hung.path, wantErr: "time limit", atLeast: 300 * time.Millisecond,
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 300*time.Millisecond)
			}},
		{name: "cancelled while waiting, no deadline", socket: hung.path, wantErr: "context canceled", atLeast: 200 * time.Millisecond,
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(200*time.Millisecond, cancel)
				return ctx, cancel
			}},
		{name: "backlog full: connect waits until the deadline", socket: fullListener(t), wantErr: "listener busy", atLeast: 300 * time.Millisecond,
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 300*time.Millisecond)
			}},
		{name: "already expired", socket: allow.path, wantErr: "time limit",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), -time.Second)
			}},
		{name: "no such socket", socket: filepath.Join(t.TempDir(), "absent.sock"), wantErr: "no such file",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 10*time.Second)
			}},
		{name: "path too long", socket: "/" + strings.Repeat("x", 200), wantErr: "too long",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 10*time.Second)
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := tt.ctx()
			defer cancel()
			req := req
			if tt.xml != "" {
				req.XML = tt.xml
			}
			start := time.Now()
			reply, err := Ask(ctx, tt.socket, req)
			took := time.Since(start)
			if tt.wantErr == "" {
				if err != nil || !reply.Allow {
					t.Fatalf("Ask: %+v, %v; want allowed", reply, err)
				}
				if got := allow.requests(); got[len(got)-1].XML != req.XML {
					t.Errorf("hostd got an XML of %d bytes, want the %d sent", len(got[len(got)-1].XML), len(req.XML))
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Ask: %v, want an error with %q", err, tt.wantErr)
			}
			// Bounded: not before the limit, and not long after it (generous for a loaded
			// machine; an unbounded wait would last DefaultTimeout, 30 s).
			if took < tt.atLeast || took > tt.atLeast+10*time.Second {
				t.Errorf("Ask returned after %v, want %v or a little more", took, tt.atLeast)
			}
		})
	}
}

// TestConnDeadlineErrors: a passed deadline is os.ErrDeadlineExceeded for reads and
// writes, and the peer's close is io.EOF.
func TestConnDeadlineErrors(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := &conn{fd: fds[0], path: "pair", deadline: time.Now().Add(100 * time.Millisecond)}
	defer c.Close()
	buf := make([]byte, 8)
	if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read with nothing sent: %v, want os.ErrDeadlineExceeded", err)
	}
	c.deadline = time.Now().Add(10 * time.Second)
	syscall.Write(fds[1], []byte("abc"))
	if n, err := c.Read(buf); n != 3 || err != nil {
		t.Errorf("read: %d, %v; want 3 bytes", n, err)
	}
	syscall.Close(fds[1])
	if _, err := c.Read(buf); !errors.Is(err, io.EOF) {
		t.Errorf("read after the peer closed: %v, want EOF", err)
	}
	c.deadline = time.Now().Add(-time.Second)
	if _, err := c.Write([]byte("x")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("write after the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
}

// TestExchange: Run given what the entry did (an Exchange) prints and decides as Run
// asking hostd itself would under the same outcome, and reads the rest of a reply from
// the entry's socket without sending anything.
func TestExchange(t *testing.T) {
	args := []string{"vm1", "prepare", "begin", "-"}
	absent := filepath.Join(t.TempDir(), "absent.sock")
	refusal, err := hookproto.AppendReply2(nil, hookproto.Reply{Message: "nkp: VM vm1: KDK version 9 is unknown"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		x      Exchange
		rest   string // written on the entry's socket by "hostd"
		code   int
		stderr []string
	}{
		{name: "connect failed", x: Exchange{Stage: StageConnect, Errno: syscall.ENOENT}, code: 1,
			stderr: []string{"did not answer on " + absent, "connect " + absent + ": no such file or directory", "start nkp-hostd"}},
		{name: "listener busy", x: Exchange{Stage: StageConnect, Errno: syscall.EAGAIN}, code: 1, stderr: []string{"listener busy"}},
		{name: "write failed", x: Exchange{Stage: StageWrite, Errno: syscall.EPIPE}, code: 1, stderr: []string{"sending the request: write " + absent + ": broken pipe"}},
		{name: "write timed out", x: Exchange{Stage: StageWrite, Errno: syscall.EAGAIN}, code: 1, stderr: []string{"time limit"}},
		{name: "setsockopt failed", x: Exchange{Stage: StageRead, Errno: syscall.EBADF, Sockopt: true}, code: 1, stderr: []string{"setsockopt: bad file descriptor"}},
		{name: "reply timed out", x: Exchange{Stage: StageRead, Errno: syscall.EAGAIN, Reply: []byte("nk")}, code: 1, stderr: []string{"time limit"}},
		{name: "reply cut short", x: Exchange{Stage: StageRead, Reply: []byte(hookproto.ReplyAllow[:6])}, code: 1, stderr: []string{"truncated"}},
		{name: "refusal, rest on the socket", x: Exchange{Stage: StageReply, Reply: refusal[:10]}, rest: string(refusal[10:]), code: 1, stderr: []string{"KDK version 9"}},
		{name: "allow, read by the entry", x: Exchange{Stage: StageReply, Reply: []byte(hookproto.ReplyAllow)}, code: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer syscall.Close(fds[1])
			syscall.Write(fds[1], []byte(tt.rest))
			syscall.Shutdown(fds[1], syscall.SHUT_WR)
			x := tt.x
			x.Start, x.Fd = time.Now(), fds[0]
			if x.Stage == StageConnect {
				syscall.Close(fds[0])
			}
			var stderr bytes.Buffer
			code := Run(args, strings.NewReader(protectedXML), &stderr, env(nil), Options{Socket: absent, Config: filepath.Join(t.TempDir(), "none.conf"), Sent: &x})
			if code != tt.code {
				t.Errorf("exit %d, want %d (%s)", code, tt.code, stderr.String())
			}
			for _, w := range tt.stderr {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr %q lacks %q", stderr.String(), w)
				}
			}
			if tt.stderr == nil && stderr.Len() != 0 {
				t.Errorf("stderr %q, want none", stderr.String())
			}
			// Nothing was sent on the socket, and Run closed it (end of file, not EAGAIN).
			syscall.SetNonblock(fds[1], true)
			var buf [1]byte
			switch n, err := syscall.Read(fds[1], buf[:]); {
			case n > 0:
				t.Errorf("Run sent bytes on the entry's socket")
			case err != nil:
				t.Errorf("the entry's socket is still open after Run: read: %v", err)
			}
		})
	}
}
