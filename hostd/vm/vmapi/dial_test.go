package vmapi

import (
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
)

// TestDialError: a user who may not open hostd's root-only socket is told to run as
// root, not asked whether hostd runs.
func TestDialError(t *testing.T) {
	c := NewClient("/run/nkp/hostd.sock")
	tests := []struct {
		errno syscall.Errno
		want  string
	}{
		{syscall.EACCES, "run nkpctl vm as root"},
		{syscall.ENOENT, "is nkp-hostd running?"},
		{syscall.ECONNREFUSED, "is nkp-hostd running?"},
	}
	for _, tt := range tests {
		err := c.dialError(&net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", tt.errno)})
		if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "/run/nkp/hostd.sock") {
			t.Errorf("%v: %q, want it to say %q and name the socket", tt.errno, err, tt.want)
		}
	}
}
