package systemd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// notifySocket listens on a unixgram socket and points NOTIFY_SOCKET at it.
func notifySocket(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", path, err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

func recv(t *testing.T, c *net.UnixConn, within time.Duration) string {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(within)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification within %v: %v", within, err)
	}
	return string(buf[:n])
}

func TestNotify(t *testing.T) {
	tests := []struct {
		name string
		send func() error
		want string
	}{
		{"ready", Ready, "READY=1"},
		{"stopping", Stopping, "STOPPING=1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := notifySocket(t)
			if err := tc.send(); err != nil {
				t.Fatalf("send: %v", err)
			}
			if got := recv(t, c, 5*time.Second); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestNotifyWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	sent, err := Notify("READY=1")
	if err != nil || sent {
		t.Fatalf("Notify without NOTIFY_SOCKET = (%v, %v), want (false, nil)", sent, err)
	}
}

func TestNotifyBrokenSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "missing.sock"))
	if _, err := Notify("READY=1"); err == nil {
		t.Fatal("Notify to a missing socket succeeded, want an error")
	}
}

func TestWatchdogInterval(t *testing.T) {
	tests := []struct {
		name    string
		usec    string
		pid     string
		want    time.Duration
		wantErr bool
	}{
		{"off", "", "", 0, false},
		{"half of WATCHDOG_USEC", "2000000", "", time.Second, false},
		{"other pid", "2000000", "1", 0, false},
		{"garbage", "soon", "", 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", tc.usec)
			t.Setenv("WATCHDOG_PID", tc.pid)
			got, err := WatchdogInterval()
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("WatchdogInterval() = (%v, %v), want (%v, err=%v)", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestRunWatchdog(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	t.Run("healthy sends keep-alives", func(t *testing.T) {
		c := notifySocket(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { RunWatchdog(ctx, log, 10*time.Millisecond, nil); close(done) }()
		for i := 0; i < 3; i++ {
			if got := recv(t, c, 5*time.Second); got != "WATCHDOG=1" {
				t.Fatalf("got %q, want WATCHDOG=1", got)
			}
		}
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("RunWatchdog did not return after cancel")
		}
	})
	t.Run("unhealthy withholds keep-alives", func(t *testing.T) {
		c := notifySocket(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		checks := make(chan struct{}, 100)
		go RunWatchdog(ctx, log, 5*time.Millisecond, func(context.Context) error {
			checks <- struct{}{}
			return errors.New("store unreachable")
		})
		for i := 0; i < 3; i++ {
			select {
			case <-checks:
			case <-time.After(5 * time.Second):
				t.Fatal("health check not called")
			}
		}
		if err := c.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		if n, err := c.Read(make([]byte, 64)); err == nil {
			t.Fatalf("keep-alive sent while unhealthy (%d bytes)", n)
		}
	})
	t.Run("zero interval returns", func(t *testing.T) {
		done := make(chan struct{})
		go func() { RunWatchdog(context.Background(), log, 0, nil); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("RunWatchdog(0) did not return")
		}
	})
}

func TestListenerFallback(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("LISTEN_PID", "")
	l, err := Listener("127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listener: %v", err)
	}
	defer l.Close()
	if _, ok := l.Addr().(*net.TCPAddr); !ok {
		t.Fatalf("fallback listener is %T, want TCP", l.Addr())
	}
	if _, err := Listener("256.0.0.1:1"); err == nil {
		t.Fatal("Listener on a bad address succeeded")
	}
}
