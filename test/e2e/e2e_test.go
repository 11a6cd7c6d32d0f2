package e2e

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestPoll(t *testing.T) {
	tests := []struct {
		name    string
		after   int // cond turns true on this call (0: never)
		timeout time.Duration
		wantErr error
	}{
		{"immediately", 1, time.Second, nil},
		{"after a few polls", 4, 5 * time.Second, nil},
		{"never", 0, 20 * time.Millisecond, ErrTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			err := Poll(tt.timeout, func() bool { calls++; return tt.after > 0 && calls >= tt.after })
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Poll = %v, want %v", err, tt.wantErr)
			}
			if tt.after > 0 && calls != tt.after {
				t.Fatalf("cond called %d times, want %d", calls, tt.after)
			}
		})
	}
}

func TestModuleRoot(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("ModuleRoot = %s, which has no go.mod: %v", root, err)
	}
}

func TestRequirePresentTool(t *testing.T) {
	// "go" runs this test, so it is in $PATH; Require must neither skip nor fail.
	Require(t, "go")
}

func TestBuildBinaryUsesNKPBin(t *testing.T) {
	dir := t.TempDir()
	prog := filepath.Join(dir, "nkp-fake")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvBin, dir)
	if got := BuildBinary(t, "./cmd/nkp-fake"); got != prog {
		t.Fatalf("BuildBinary = %s, want the prebuilt %s", got, prog)
	}
}

// TestKillListener: a blocked Accept fails once the listener is shut down, and so does
// the next one.
func TestKillListener(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	KillListener(t, ln)
	select {
	case err := <-accepted:
		if err == nil {
			t.Fatal("Accept succeeded on a killed listener")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still blocked 10 s after KillListener")
	}
	if _, err := ln.Accept(); err == nil {
		t.Fatal("a later Accept succeeded on a killed listener")
	}
}
