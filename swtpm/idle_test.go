package swtpm

import (
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/internal/idletrim"
)

// trimCounter stands in for idletrim's Trim and reports each call.
type trimCounter chan struct{}

func (c trimCounter) trim() (idletrim.Result, error) {
	c <- struct{}{}
	return idletrim.Result{Regions: 1, KiB: 4}, nil
}

// wait waits for the next trim, up to 10 s.
func (c trimCounter) wait(t *testing.T, after string) {
	t.Helper()
	select {
	case <-c:
	case <-time.After(10 * time.Second):
		t.Fatalf("no idle trim within 10 s %s", after)
	}
}

// none checks that no trim comes during d.
func (c trimCounter) none(t *testing.T, d time.Duration, why string) {
	t.Helper()
	select {
	case <-c:
		t.Fatalf("an idle trim %s", why)
	case <-time.After(d):
	}
}

// TestIdleTrim: the server trims once after IdleTrim without activity, not again
// while nothing happens (its waits back off), and again after a control request or
// a data command on the Go loop.
func TestIdleTrim(t *testing.T) {
	const idle = 20 * time.Millisecond
	tc := make(trimCounter, 8)
	store := newMemStore()
	h := startServerHooked(t, newFakeEngine(store), store, func(c *Config) { c.IdleTrim = idle },
		func(s *Server) { s.trim = tc.trim })
	tc.wait(t, "after the start")
	// The loop looks again after 40, 80, 160 ms: none of these may trim.
	tc.none(t, 300*time.Millisecond, "came again without activity")

	c := h.dialCtrl()
	if r := c.result(ctrl.Init{}); r != ctrl.ResSuccess {
		t.Fatalf("INIT = %v", r)
	}
	tc.wait(t, "after a control request")

	res, dc := c.setDataFD()
	if res != ctrl.ResSuccess {
		t.Fatalf("SET_DATAFD = %v", res)
	}
	tc.wait(t, "after SET_DATAFD")
	tc.none(t, 100*time.Millisecond, "came again without activity")
	if rc := rcOf(tpmCall(t, dc, cmdStartupClear)); rc != 0 {
		t.Fatalf("Startup rc %#x", rc)
	}
	tc.wait(t, "after a data command")
}

// TestIdleTrimOff: without IdleTrim the server never trims.
func TestIdleTrimOff(t *testing.T) {
	tc := make(trimCounter, 8)
	store := newMemStore()
	startServerHooked(t, newFakeEngine(store), store, nil, func(s *Server) { s.trim = tc.trim })
	tc.none(t, 200*time.Millisecond, "ran with IdleTrim 0")
}

// TestRealEngineIdleTrimDataLoop: commands served by libtpms' C data loop, which never
// enters Go per command, count as activity through the engine's own counter.
func TestRealEngineIdleTrimDataLoop(t *testing.T) {
	eng, d := realTPM(t, shortDir(t), nil)
	tc := make(trimCounter, 8)
	h := startServerHooked(t, eng, d, func(c *Config) { c.IdleTrim = 20 * time.Millisecond },
		func(s *Server) { s.trim = tc.trim })
	tpm := initAndConnect(t, h.dialCtrl(), true)
	before := eng.DataLoopCommands()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup: %v", err)
	}
	if n := eng.DataLoopCommands() - before; n != 1 {
		t.Fatalf("DataLoopCommands grew by %d for one command", n)
	}
	tc.wait(t, "after the start")
	for range 3 {
		// Only the data channel is used: the trim must follow each command.
		if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
			t.Fatalf("GetRandom: %v", err)
		}
		tc.wait(t, "after a data-loop command")
	}
	closeReal(t, h, eng, d)
}
