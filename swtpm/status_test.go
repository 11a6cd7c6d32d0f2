package swtpm

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
)

// TestStatusChannel: while a control client (QEMU) holds the control channel, the status
// channel answers GET_TPMESTABLISHED from the TPM and GET_CAPABILITY, one request per
// connection, and refuses anything that would change the TPM.
func TestStatusChannel(t *testing.T) {
	var statusPath string
	h := startServer(t, func(c *Config) {
		statusPath = filepath.Join(filepath.Dir(c.CtrlListener.Addr().String()), "status")
		l, err := net.Listen("unix", statusPath)
		if err != nil {
			t.Fatal(err)
		}
		c.StatusListener = l
	})
	qemu := h.dialCtrl()
	if r := qemu.result(ctrl.Init{}); r != ctrl.ResSuccess {
		t.Fatalf("INIT: %v", r)
	}
	ask := func(req ctrl.Request) (ctrl.Response, error) {
		c, err := net.Dial("unix", statusPath)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(ioTimeout))
		if _, err := c.Write(req.Marshal()); err != nil {
			return nil, err
		}
		return ctrl.ReadResponse(c, req.Code())
	}
	tests := []struct {
		name string
		req  ctrl.Request
		want ctrl.Result
	}{
		{"GET_TPMESTABLISHED", ctrl.GetEstablished{}, ctrl.ResSuccess},
		{"GET_CAPABILITY", ctrl.GetCapability{}, ctrl.ResSuccess},
		{"INIT refused", ctrl.Init{}, ctrl.ResBadOrdinal},
		{"SHUTDOWN refused", ctrl.Shutdown{}, ctrl.ResBadOrdinal},
		{"GET_TPMESTABLISHED again", ctrl.GetEstablished{}, ctrl.ResSuccess},
	}
	for _, tt := range tests {
		resp, err := ask(tt.req)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		got := ctrl.ResSuccess
		switch r := resp.(type) {
		case ctrl.EstablishedResponse:
			got = r.Result
		case ctrl.ResultResponse:
			got = r.Result
		}
		if got != tt.want {
			t.Errorf("%s: result %v, want %v", tt.name, got, tt.want)
		}
	}
	// The control client was not disturbed: the TPM still runs and answers it.
	if r := qemu.result(ctrl.GetEstablished{}); r != ctrl.ResSuccess {
		t.Errorf("the control client after the status requests: %v", r)
	}
	if h.srv.stopping() {
		t.Error("a refused status request stopped the server")
	}
}
