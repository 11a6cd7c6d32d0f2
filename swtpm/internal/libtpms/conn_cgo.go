//go:build cgo

package libtpms

// #include <stdlib.h>
// #include "conn.h"
import "C"

import (
	"fmt"
	"runtime/cgo"
	"syscall"
)

// ServeConn answers the TPM commands that arrive on fd, a connected stream
// socket (unix or TCP), until the connection ends, and reports how. It frames
// commands as package swtpm/data does (the TPM_SEND_COMMAND prefix included:
// its locality is applied, and the reply framed to match), answers
// TPM_RC_FAILURE while the TPM is not running, and writes each response only
// after TPMLIB_Process returned, so after a state change was stored.
//
// The loop runs in C on the calling goroutine's thread, which it keeps for the
// connection's life: a command costs a poll, a read and a write, with no
// transition into Go (the Go scheduler, its netpoller and sysmon stay asleep)
// except when libtpms stores its state through the NVRAM or a command fails.
// Each command is executed under the TPM's lock, so Lock/Unlock and every other
// method exclude it. The caller keeps fd: to end the loop from elsewhere, shut
// the socket down (shutdown(2)); close fd only after ServeConn returned. fd is
// set non-blocking.
func (t *TPM) ServeConn(fd int, o ConnOptions) ConnEnd {
	var h cgo.Handle
	if o.OnCommandError != nil {
		h = cgo.NewHandle(o.OnCommandError)
		defer h.Delete()
	}
	copts := C.struct_nkp_conn_opts{
		fd:                 C.int(fd),
		max_cmd:            C.uint32_t(max(o.MaxCommand, 10)),
		msg_timeout_ms:     C.int(o.MessageTimeout.Milliseconds()),
		write_timeout_ms:   C.int(o.WriteTimeout.Milliseconds()),
		reject_locality4:   cbool(o.RejectLocality4),
		allow_set_locality: cbool(o.AllowSetLocality),
		disconnect:         cbool(o.Disconnect),
		handle:             C.uintptr_t(h),
	}
	var end C.struct_nkp_conn_end
	C.nkp_serve_conn(&copts, &end)
	e := ConnEnd{
		Reason:   EndReason(end.why),
		Size:     uint32(end.size),
		Prefixed: end.prefixed != 0,
		Pending:  int(end.pending),
		Commands: uint64(end.commands),
	}
	if end.err != 0 {
		e.Err = syscall.Errno(end.err)
	}
	return e
}

func cbool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// connCommandFailed reports a command the data loop could not execute to the
// connection's OnCommandError, with the callbacks' errors. Called with the
// lock held, from nkpConnCommandFailed.
func connCommandFailed(h uintptr, cc, rc, n uint32) {
	var cbErr error
	if t := current.Load(); t != nil {
		cbErr = t.takeCallbackErr()
	}
	if h == 0 {
		return
	}
	report, _ := cgo.Handle(h).Value().(func(error))
	if report == nil {
		return
	}
	var err error
	switch {
	case cbErr != nil:
		err = fmt.Errorf("libtpms: command 0x%x: %w (libtpms is now in failure mode; do not acknowledge the command)", cc, cbErr)
	case rc != 0:
		err = fmt.Errorf("libtpms: command 0x%x: %w", cc, Result(rc))
	default:
		err = fmt.Errorf("libtpms: command 0x%x: libtpms returned a %d-byte response, shorter than a TPM header: %w", cc, n, ResultFail)
	}
	report(err)
}

// cFrame runs the data loop's framing (nkp_frame) on b, for the fuzz test that
// holds it to package data's Frame. r is 1 (a command: off, n, size, prefixed,
// locality), 0 (need more: need) or -1 (a refused size: size, prefixed).
func cFrame(b []byte, maxCmd uint32) (r int, off, n, need int, size uint32, prefixed bool, locality uint8) {
	var f C.struct_nkp_frame
	p := C.CBytes(b) // never nil, even for an empty b
	defer C.free(p)
	r = int(C.nkp_frame((*C.uchar)(p), C.size_t(len(b)), C.uint32_t(maxCmd), &f))
	return r, int(f.off), int(f.n), int(f.need), uint32(f.size), f.prefixed != 0, uint8(f.locality)
}
