package provider_test

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestDeadListenerExits: when the listening socket dies under `nkp-provider serve`
// (shutdown(2) on the test's copy of the socket it handed over: accept fails with
// EINVAL), the process does not stay up looking healthy and feeding the watchdog: it
// logs why and exits non-zero, so that systemd restarts it.
func TestDeadListenerExits(t *testing.T) {
	b := build(t)
	dir := b.initProvider(t)
	s, ln := b.serveOn(t, dir, []string{"WATCHDOG_USEC=2000000"})
	defer ln.Close()
	if status, _ := rawGet(t, s.url+"/healthz", filepath.Join(dir, "ca.crt")); status != 200 {
		t.Fatalf("healthz = %d", status)
	}
	e2e.KillListener(t, ln)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("nkp-provider still runs 30 s after its listener died:\n%s", s.Logs())
	}
	if code := s.cmd.ProcessState.ExitCode(); code == 0 {
		t.Fatalf("nkp-provider exited 0 after its listener died; systemd would not restart it:\n%s", s.Logs())
	}
	if logs := s.Logs(); !strings.Contains(logs, "provider server failed; stopping") || !strings.Contains(logs, "invalid argument") {
		t.Fatalf("the log does not say the server failed and why:\n%s", logs)
	}
}

// procFDs counts the open descriptors of process pid.
func procFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("descriptors of nkp-provider: %v", err)
	}
	return len(ents)
}

// TestIdleConnectionFlood: one source opening 1,000 idle TCP connections to `nkp-provider
// serve` gets --max-conns-per-source of them; the provider's descriptors stay bounded,
// /healthz answers another source, and the refusals are logged at warn.
func TestIdleConnectionFlood(t *testing.T) {
	const perSource, flood = 16, 1000
	b := build(t)
	dir := b.initProvider(t)
	s := b.serve(t, dir, "--max-conns-per-source", fmt.Sprint(perSource))
	pid := s.cmd.Process.Pid // sh exec'd nkp-provider in place
	if status, _ := rawGet(t, s.url+"/healthz", filepath.Join(dir, "ca.crt")); status != 200 {
		t.Fatalf("healthz = %d", status)
	}
	base := procFDs(t, pid)
	addr := strings.TrimPrefix(s.url, "https://")
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range flood {
		c, err := d.Dial("tcp", addr)
		if errors.Is(err, syscall.ECONNRESET) {
			continue // refused before connect(2) returned
		}
		if err != nil {
			t.Fatalf("dial %s from 127.0.0.2: %v", addr, err)
		}
		conns = append(conns, c)
	}
	e2e.WaitFor(t, 20*time.Second, "the provider refuses the connections over its per-source cap", func() bool {
		return strings.Count(s.Logs(), "connection refused") > 0 && procFDs(t, pid) <= base+perSource+8
	})
	if status, _ := rawGet(t, s.url+"/healthz", filepath.Join(dir, "ca.crt")); status != 200 {
		t.Fatalf("healthz from 127.0.0.1 while 127.0.0.2 floods = %d", status)
	}
	if got := procFDs(t, pid) - base; got > perSource+8 {
		t.Fatalf("nkp-provider holds %d more descriptors with %d connections from one source, want at most %d", got, flood, perSource+8)
	}
	if !strings.Contains(s.Logs(), `"level":"WARN","msg":"connection refused: 16 connections are open from this source`) {
		t.Fatalf("refusals not logged at warn:\n%s", s.Logs())
	}
}
