//go:build cgo

package libtpms

// // Link Debian's libtpms and OpenSSL (packages libtpms-dev and libssl-dev: headers
// // in /usr/include, the libraries in the default library path). No CFLAGS are
// // needed. By default the shared libraries; with -tags nkpstatic their static
// // archives, libc staying shared (see "Linking" in doc.go).
// #cgo !nkpstatic LDFLAGS: -ltpms -lcrypto
// #cgo nkpstatic LDFLAGS: -Wl,-Bstatic -ltpms -lcrypto -Wl,-Bdynamic -ldl -pthread
//
// #include <stdlib.h>
// #include <string.h>
// #include <libtpms/tpm_library.h>
// #include <libtpms/tpm_error.h>
// #include <libtpms/tpm_memory.h>
// #include <libtpms/tpm_tis.h>
// #include "conn.h"
//
// // The Go callbacks of callbacks_cgo.go (//export).
// extern TPM_RESULT nkpNvramInit(void);
// extern TPM_RESULT nkpNvramLoad(unsigned char **data, uint32_t *length, char *name);
// extern TPM_RESULT nkpNvramStore(unsigned char *data, uint32_t length, char *name);
// extern TPM_RESULT nkpNvramDelete(char *name, TPM_BOOL mustExist);
// extern TPM_RESULT nkpIoInit(void);
// extern TPM_RESULT nkpIoGetPhysicalPresence(TPM_BOOL *pp);
//
// // Trampolines: libtpms' callback signatures carry const and a tpm_number
// // (always 0); the exported Go functions take neither.
// static TPM_RESULT nkp_nvram_init(void) { return nkpNvramInit(); }
// // A failed callback is noted in nkp_cb_failed, which the data loop checks (a
// // missing blob, TPM_RETRY, is no failure).
// static TPM_RESULT nkp_noted(TPM_RESULT rc) {
//     if (rc != 0 && rc != TPM_RETRY)
//         nkp_cb_failed = 1;
//     return rc;
// }
// static TPM_RESULT nkp_nvram_loaddata(unsigned char **data, uint32_t *length,
//                                      uint32_t tpm_number, const char *name) {
//     (void)tpm_number;
//     return nkp_noted(nkpNvramLoad(data, length, (char *)name));
// }
// static TPM_RESULT nkp_nvram_storedata(const unsigned char *data, uint32_t length,
//                                       uint32_t tpm_number, const char *name) {
//     (void)tpm_number;
//     return nkp_noted(nkpNvramStore((unsigned char *)data, length, (char *)name));
// }
// static TPM_RESULT nkp_nvram_deletename(uint32_t tpm_number, const char *name,
//                                        TPM_BOOL mustExist) {
//     (void)tpm_number;
//     return nkp_noted(nkpNvramDelete((char *)name, mustExist));
// }
// static TPM_RESULT nkp_io_init(void) { return nkpIoInit(); }
// // The locality is C state, so that a command needs no call into Go for it.
// static TPM_RESULT nkp_io_getlocality(TPM_MODIFIER_INDICATOR *loc, uint32_t tpm_number) {
//     (void)tpm_number;
//     *loc = nkp_locality;
//     return 0;
// }
// static TPM_RESULT nkp_io_getphysicalpresence(TPM_BOOL *pp, uint32_t tpm_number) {
//     (void)tpm_number;
//     return nkpIoGetPhysicalPresence(pp);
// }
//
// static TPM_RESULT nkp_register_callbacks(void) {
//     struct libtpms_callbacks cbs; // libtpms copies the struct
//     memset(&cbs, 0, sizeof(cbs));
//     cbs.sizeOfStruct = sizeof(cbs);
//     cbs.tpm_nvram_init = nkp_nvram_init;
//     cbs.tpm_nvram_loaddata = nkp_nvram_loaddata;
//     cbs.tpm_nvram_storedata = nkp_nvram_storedata;
//     cbs.tpm_nvram_deletename = nkp_nvram_deletename;
//     cbs.tpm_io_init = nkp_io_init;
//     cbs.tpm_io_getlocality = nkp_io_getlocality;
//     cbs.tpm_io_getphysicalpresence = nkp_io_getphysicalpresence;
//     return TPMLIB_RegisterCallbacks(&cbs);
// }
//
// static void nkp_free_resp(void) {
//     if (nkp_resp != NULL) {
//         memset(nkp_resp, 0, nkp_resp_cap);
//         TPM_Free(nkp_resp);
//     }
//     nkp_resp = NULL;
//     nkp_resp_cap = 0;
// }
//
// // Forget the blobs cached by TPMLIB_SetState: libtpms drops them whenever
// // the chosen TPM version changes, and has no other call for it.
// static void nkp_clear_cached_state(void) {
//     TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_1_2);
//     TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_2);
// }
import "C"

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// current is the TPM that libtpms' callbacks serve. libtpms keeps one TPM in
// global C state; this one variable mirrors that and is the package's only
// mutable package-level state. Open sets it, Close clears it.
var current atomic.Pointer[TPM]

// maxCommand bounds what Process hands to libtpms: far above any buffer size
// libtpms accepts (4096), low enough that a hostile size cannot grow the C
// buffer without limit. libtpms answers oversized commands with
// TPM_RC_COMMAND_SIZE itself.
const maxCommand = 64 << 10

// TPM is the process' libtpms TPM 2.0. Its methods are safe for concurrent
// use; they are serialised, as libtpms is not reentrant.
//
// The lock that serialises them is a C mutex (conn.c), so that the data loop of
// ServeConn can take it without entering Go. Whether the TPM runs, its locality,
// the last command code and libtpms' response buffer are C state under that lock.
type TPM struct {
	nv NVRAM // set by Open, read by the callbacks

	// Guarded by the C lock (lock/unlock). The callbacks run on the thread that
	// holds it and use them freely.
	closed bool
	cbErr  error    // errors callbacks hit during the current libtpms call
	cmd    *C.uchar // C copy of the command, reused, wiped after each call
	cmdCap int      // size of cmd
	// offThread makes MainInit and Process run libtpms on a thread of their own
	// (SetOffThread).
	offThread bool
}

// SetOffThread makes MainInit and Process, while on, run their libtpms call on a
// new OS thread of their own, while the calling goroutine, still holding the
// engine's lock, waits in Go's network poller: the process' one P is then free for
// its other goroutines, where during a call on the goroutine's own thread nothing
// else runs until the runtime's monitor takes the P back (a tick of up to
// milliseconds). The vTPM server turns it on for the TPM's start at launch, so that
// the control channel answers meanwhile. A call costs a thread start (tens of µs),
// which is why it is not the default. Call it under Lock.
func (t *TPM) SetOffThread(on bool) { t.offThread = on }

// run makes one libtpms call, op 0 TPMLIB_MainInit or op 1 nkp_process of
// t.cmd[0:n], on this thread or (offThread) on a thread of its own, and returns its
// result and, for nkp_process, the response length. The lock is held.
func (t *TPM) run(op int, n int) (C.uint32_t, C.uint32_t) {
	if t.offThread {
		if rc, rlen, err := t.runOffThread(op, n); err == nil {
			return rc, rlen
		}
		// No thread or no pipe: make the call here, as without offThread.
	}
	if op == 0 {
		return C.uint32_t(C.TPMLIB_MainInit()), 0
	}
	var rlen C.uint32_t
	rc := C.nkp_process(t.cmd, C.uint32_t(n), &rlen)
	return rc, rlen
}

// runOffThread makes run's call on a thread of its own and waits for it in the
// network poller. An error means the call was not made.
func (t *TPM) runOffThread(op int, n int) (C.uint32_t, C.uint32_t, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, 0, err
	}
	defer r.Close()
	defer w.Close()
	j := (*C.struct_nkp_job)(C.calloc(1, C.size_t(unsafe.Sizeof(C.struct_nkp_job{}))))
	if j == nil {
		return 0, 0, errors.New("out of memory")
	}
	defer C.free(unsafe.Pointer(j))
	j.op, j.cmd, j.len, j.fd = C.int(op), t.cmd, C.uint32_t(n), C.int(w.Fd())
	if e := C.nkp_job_start(j); e != 0 {
		return 0, 0, syscall.Errno(e)
	}
	var b [1]byte
	r.Read(b[:])      // os.File retries EINTR itself; the thread writes once it is done
	C.nkp_job_join(j) // the thread wrote its byte (or the read failed): it ends now
	return j.rc, j.rlen, nil
}

// lock takes the engine's lock. The C mutex is recursive and owned by an OS
// thread, so the goroutine stays on its thread until unlock.
func (t *TPM) lock() {
	runtime.LockOSThread()
	C.nkp_lock()
}

func (t *TPM) unlock() {
	C.nkp_unlock()
	runtime.UnlockOSThread()
}

// Lock takes the lock every call into libtpms is made under, for a caller that
// must make several calls with no command of ServeConn's data loop in between
// (the vTPM server around each control request). The TPM's methods may be
// called while it is held, from the same goroutine; Unlock releases it.
func (t *TPM) Lock() { t.lock() }

// Unlock releases the lock taken by Lock.
func (t *TPM) Unlock() { t.unlock() }

// Open makes the process' TPM 2.0 with its NVRAM callbacks landing in nv. It
// does not start the TPM: give saved state with SetState if there is any,
// then call MainInit. Only one TPM may be open per process (ErrInUse).
func Open(nv NVRAM) (*TPM, error) {
	if nv == nil {
		return nil, errors.New("libtpms: Open needs an NVRAM for the TPM's state, got nil")
	}
	t := &TPM{nv: nv}
	if !current.CompareAndSwap(nil, t) {
		return nil, ErrInUse
	}
	t.lock()
	defer t.unlock()
	C.nkp_running, C.nkp_locality, C.nkp_last_cc = 0, 0, 0
	C.nkp_clear_cached_state() // blobs a previous TPM in this process left behind
	if rc := C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_2); rc != 0 {
		current.Store(nil)
		return nil, fmt.Errorf("libtpms: choosing TPM 2.0: %w (is libtpms built with TPM 2 support?)", Result(rc))
	}
	if rc := C.nkp_register_callbacks(); rc != 0 {
		current.Store(nil)
		return nil, fmt.Errorf("libtpms: registering NVRAM callbacks: %w", Result(rc))
	}
	// The buffer size is libtpms global state too: start each TPM at the
	// maximum, as swtpm does.
	var lo, hi C.uint32_t
	C.TPMLIB_SetBufferSize(0, &lo, &hi)
	C.TPMLIB_SetBufferSize(hi, nil, nil)
	return t, nil
}

// Close stops the TPM if it runs (without TPM2_Shutdown: send one first if
// the state should be orderly), drops blobs given to SetState and releases
// the process' TPM for another Open. Closing twice is a no-op.
func (t *TPM) Close() error {
	t.lock()
	defer t.unlock()
	if t.closed {
		return nil
	}
	if C.nkp_running != 0 {
		C.TPMLIB_Terminate()
		C.nkp_running = 0
	}
	C.nkp_clear_cached_state()
	if t.cmd != nil {
		C.memset(unsafe.Pointer(t.cmd), 0, C.size_t(t.cmdCap))
		C.free(unsafe.Pointer(t.cmd))
		t.cmd, t.cmdCap = nil, 0
	}
	C.nkp_free_resp()
	t.closed = true
	current.CompareAndSwap(t, nil)
	return nil
}

// noteCallbackErr records an error a callback met; the libtpms call that led
// to the callback reports it. Called with the lock held by the caller.
func (t *TPM) noteCallbackErr(err error) {
	t.cbErr = errors.Join(t.cbErr, err)
}

// takeCallbackErr returns and resets the callbacks' errors.
func (t *TPM) takeCallbackErr() error {
	err := t.cbErr
	t.cbErr = nil
	return err
}

// checkLocked returns ErrClosed, or ErrNotRunning/ErrRunning when the TPM is
// not in the wanted state (want: 1 running, -1 stopped, 0 either).
func (t *TPM) checkLocked(op string, want int) error {
	switch {
	case t.closed:
		return fmt.Errorf("libtpms: %s: %w", op, ErrClosed)
	case want > 0 && C.nkp_running == 0:
		return fmt.Errorf("libtpms: %s: %w", op, ErrNotRunning)
	case want < 0 && C.nkp_running != 0:
		return fmt.Errorf("libtpms: %s: %w", op, ErrRunning)
	}
	t.cbErr = nil
	return nil
}

// libtpmsType converts a StateType to libtpms' bit value.
func libtpmsType(typ StateType) (C.enum_TPMLIB_StateType, error) {
	switch typ {
	case Permanent:
		return C.TPMLIB_STATE_PERMANENT, nil
	case Volatile:
		return C.TPMLIB_STATE_VOLATILE, nil
	case SaveState:
		return C.TPMLIB_STATE_SAVE_STATE, nil
	}
	return 0, fmt.Errorf("libtpms: unknown state blob type %d, want 1 (permanent), 2 (volatile) or 3 (savestate): %w", uint32(typ), ResultBadParameter)
}

// SetState gives libtpms a state blob for the next MainInit, which then uses
// it instead of asking the NVRAM. The TPM must be stopped. nil (or empty)
// sets an empty blob of that type: MainInit then starts without one and does
// not ask the NVRAM for it (swtpm's SET_STATEBLOB with length 0). libtpms
// validates the blob now; a volatile blob is checked against the permanent
// state, so set Permanent first (or have permall in the NVRAM). When libtpms
// rejects a blob it also drops every blob set before.
func (t *TPM) SetState(typ StateType, blob []byte) error {
	st, err := libtpmsType(typ)
	if err != nil {
		return err
	}
	if len(blob) > MaxBlobSize {
		return fmt.Errorf("libtpms: SetState %s: blob of %d bytes exceeds %d: %w", typ, len(blob), MaxBlobSize, ResultSize)
	}
	t.lock()
	defer t.unlock()
	if err := t.checkLocked("SetState "+typ.String(), -1); err != nil {
		return err
	}
	var rc C.TPM_RESULT
	if len(blob) == 0 {
		rc = C.TPMLIB_SetState(st, nil, 0)
	} else {
		p := C.CBytes(blob)
		rc = C.TPMLIB_SetState(st, (*C.uchar)(p), C.uint32_t(len(blob)))
		C.memset(p, 0, C.size_t(len(blob)))
		C.free(p)
	}
	if rc != 0 {
		return fmt.Errorf("libtpms: SetState %s (%d bytes): libtpms rejected the blob (corrupt, or from an incompatible TPM; blobs set before were dropped too): %w", typ, len(blob), errors.Join(Result(rc), t.takeCallbackErr()))
	}
	return t.takeCallbackErr()
}

// GetState returns a state blob. On a running TPM it is the current state,
// serialised now; on a stopped one it is the blob set with SetState, or else
// what the NVRAM holds. ErrNoState (wrapping fs.ErrNotExist) when libtpms has
// none, as for SaveState on a TPM 2.
func (t *TPM) GetState(typ StateType) ([]byte, error) {
	st, err := libtpmsType(typ)
	if err != nil {
		return nil, err
	}
	t.lock()
	defer t.unlock()
	if err := t.checkLocked("GetState "+typ.String(), 0); err != nil {
		return nil, err
	}
	var buf *C.uchar
	var n C.uint32_t
	rc := C.TPMLIB_GetState(st, &buf, &n)
	cbErr := t.takeCallbackErr()
	if rc == C.TPM_RETRY && cbErr == nil {
		return nil, fmt.Errorf("libtpms: GetState %s: %w", typ, ErrNoState)
	}
	if rc != 0 {
		if buf != nil {
			C.TPM_Free(buf)
		}
		return nil, fmt.Errorf("libtpms: GetState %s: %w", typ, errors.Join(Result(rc), cbErr))
	}
	if buf == nil || n == 0 {
		return nil, fmt.Errorf("libtpms: GetState %s: %w", typ, ErrNoState)
	}
	return takeCBuffer(buf, n), cbErr
}

// takeCBuffer copies a libtpms-allocated buffer to Go, wipes and frees it.
func takeCBuffer(buf *C.uchar, n C.uint32_t) []byte {
	out := C.GoBytes(unsafe.Pointer(buf), C.int(n))
	C.memset(unsafe.Pointer(buf), 0, C.size_t(n))
	C.TPM_Free(buf)
	return out
}

// MainInit starts the TPM (TPMLIB_MainInit): it takes the blobs given to
// SetState, else loads "permall" and "volatilestate" through the NVRAM, and
// manufactures a new TPM when there is no permall. The TPM then expects
// TPM2_Startup, unless a volatile state was restored.
func (t *TPM) MainInit() error {
	t.lock()
	defer t.unlock()
	if err := t.checkLocked("MainInit", -1); err != nil {
		return err
	}
	rc, _ := t.run(0, 0)
	cbErr := t.takeCallbackErr()
	if rc != 0 {
		C.TPMLIB_Terminate() // leave libtpms stopped and its version unlocked, as swtpm does
		reason := "the state could not be loaded or is corrupt; the TPM is left stopped and the NVRAM untouched"
		return fmt.Errorf("libtpms: MainInit: %s: %w", reason, errors.Join(Result(rc), cbErr))
	}
	if cbErr != nil {
		C.TPMLIB_Terminate()
		return fmt.Errorf("libtpms: MainInit: %w", cbErr)
	}
	C.nkp_running = 1
	C.nkp_last_cc = 0
	return nil
}

// Terminate stops the TPM (TPMLIB_Terminate) without TPM2_Shutdown and
// without storing anything: state not yet stored through the NVRAM is lost.
// A stopped or closed TPM is left as it is.
func (t *TPM) Terminate() {
	t.lock()
	defer t.unlock()
	if t.closed || C.nkp_running == 0 {
		return
	}
	C.TPMLIB_Terminate()
	C.nkp_running = 0
}

// Process executes one TPM 2.0 command and returns the response. A command
// that changes NV state returns only after the NVRAM's Store of the new
// "permall" returned. If that Store failed, Process returns an error wrapping
// it (and no response): libtpms is then in failure mode and answers every
// further command with TPM_RC_FAILURE, so do not acknowledge the command.
func (t *TPM) Process(cmd []byte) ([]byte, error) {
	if len(cmd) > maxCommand {
		return nil, fmt.Errorf("libtpms: Process: command of %d bytes exceeds %d: %w", len(cmd), maxCommand, ResultSize)
	}
	t.lock()
	defer t.unlock()
	if err := t.checkLocked("Process", 1); err != nil {
		return nil, err
	}
	if t.cmdCap < len(cmd) || t.cmd == nil {
		if t.cmd != nil {
			C.free(unsafe.Pointer(t.cmd))
		}
		t.cmdCap = max(len(cmd), 4096)
		t.cmd = (*C.uchar)(C.malloc(C.size_t(t.cmdCap)))
		if t.cmd == nil {
			t.cmdCap = 0
			return nil, fmt.Errorf("libtpms: Process: out of memory for a %d-byte command", len(cmd))
		}
	}
	in := unsafe.Slice((*byte)(unsafe.Pointer(t.cmd)), t.cmdCap)
	copy(in, cmd)
	rc, n := t.run(1, len(cmd))
	clear(in[:len(cmd)]) // commands carry auth values and NV data
	cbErr := t.takeCallbackErr()
	var out []byte
	if C.nkp_resp != nil && n > 0 && n <= C.nkp_resp_cap {
		resp := unsafe.Slice((*byte)(unsafe.Pointer(C.nkp_resp)), n)
		out = append([]byte(nil), resp...)
		clear(resp)
	}
	code := commandCode(cmd)
	if cbErr != nil {
		return nil, fmt.Errorf("libtpms: command 0x%x: %w (libtpms is now in failure mode; do not acknowledge the command)", code, cbErr)
	}
	if rc != 0 {
		return nil, fmt.Errorf("libtpms: command 0x%x: %w", code, Result(rc))
	}
	if len(out) < 10 {
		return nil, fmt.Errorf("libtpms: command 0x%x: libtpms returned a %d-byte response, shorter than a TPM header: %w", code, len(out), ResultFail)
	}
	return out, nil
}

// commandCode reads the command code of a TPM command for error messages.
func commandCode(cmd []byte) uint32 {
	if len(cmd) < 10 {
		return 0
	}
	return uint32(cmd[6])<<24 | uint32(cmd[7])<<16 | uint32(cmd[8])<<8 | uint32(cmd[9])
}

// SetLocality sets the locality that the getlocality callback reports to
// libtpms for the following commands. It survives MainInit and Terminate, as
// swtpm's locality does across INIT.
func (t *TPM) SetLocality(loc uint8) {
	t.lock()
	defer t.unlock()
	C.nkp_locality = C.uint8_t(loc)
}

// LastCommand returns the command code of the last command the TPM executed
// since MainInit (0 if none), whether it came through Process or ServeConn.
func (t *TPM) LastCommand() uint32 {
	t.lock()
	defer t.unlock()
	return uint32(C.nkp_last_cc)
}

// DataLoopCommands returns how many commands ServeConn has received since the
// process started, over all connections (a command refused for its locality or
// answered while the TPM is not running counts too). It takes no lock and costs the
// data loop one store per command: package swtpm reads it to tell an idle TPM.
func (t *TPM) DataLoopCommands() uint64 {
	return uint64(C.nkp_conn_commands_load())
}

// VolatileAllStore serialises the running TPM's volatile state
// (TPMLIB_VolatileAll_Store), for the caller to store as "volatilestate".
func (t *TPM) VolatileAllStore() ([]byte, error) {
	t.lock()
	defer t.unlock()
	if err := t.checkLocked("VolatileAllStore", 1); err != nil {
		return nil, err
	}
	var buf *C.uchar
	var n C.uint32_t
	if rc := C.TPMLIB_VolatileAll_Store(&buf, &n); rc != 0 {
		if buf != nil {
			C.TPM_Free(buf)
		}
		return nil, fmt.Errorf("libtpms: VolatileAllStore: %w", Result(rc))
	}
	if buf == nil || n == 0 {
		return nil, fmt.Errorf("libtpms: VolatileAllStore: libtpms returned no state: %w", ResultFail)
	}
	return takeCBuffer(buf, n), nil
}

// SetBufferSize sets libtpms' I/O buffer size, which also sets the TPM's
// TPM2_PT_MAX_COMMAND_SIZE and MAX_RESPONSE_SIZE; want 0 only queries. The
// size is clamped to [min, max] (2808 and 4096 for libtpms 0.9). Setting a
// size needs a stopped TPM (ErrRunning otherwise); a query works always.
func (t *TPM) SetBufferSize(want uint32) (actual, min, max uint32, err error) {
	t.lock()
	defer t.unlock()
	state := 0
	if want != 0 {
		state = -1
	}
	if err := t.checkLocked(fmt.Sprintf("SetBufferSize(%d)", want), state); err != nil {
		return 0, 0, 0, err
	}
	var lo, hi C.uint32_t
	got := C.TPMLIB_SetBufferSize(C.uint32_t(want), &lo, &hi)
	return uint32(got), uint32(lo), uint32(hi), nil
}

// Info returns libtpms' JSON description (TPMLIB_GetInfo) for the flags of
// GET_INFO: 1 specification, 2 attributes, 4 features. libtpms 0.9 ignores
// the newer flags and returns "{}" when none of its flags is set.
func (t *TPM) Info(flags uint64) (string, error) {
	t.lock()
	defer t.unlock()
	if err := t.checkLocked("Info", 0); err != nil {
		return "", err
	}
	s := C.TPMLIB_GetInfo(C.enum_TPMLIB_InfoFlags(flags & 0xffffffff))
	if s == nil {
		return "", fmt.Errorf("libtpms: Info(0x%x): libtpms returned no JSON (out of memory?): %w", flags, ResultFail)
	}
	defer C.free(unsafe.Pointer(s))
	return C.GoString(s), nil
}

// HashStart begins the TIS locality-4 hash sequence (_TPM_Hash_Start).
func (t *TPM) HashStart() error {
	return t.call("HashStart", func() C.TPM_RESULT { return C.TPM_IO_Hash_Start() })
}

// HashData feeds data to the hash sequence (_TPM_Hash_Data).
func (t *TPM) HashData(p []byte) error {
	if len(p) == 0 {
		return t.call("HashData", func() C.TPM_RESULT { return 0 })
	}
	return t.call("HashData", func() C.TPM_RESULT {
		c := C.CBytes(p)
		defer C.free(c)
		return C.TPM_IO_Hash_Data((*C.uchar)(c), C.uint32_t(len(p)))
	})
}

// HashEnd ends the hash sequence (_TPM_Hash_End), which extends PCR 17 and
// sets the TPM-established flag.
func (t *TPM) HashEnd() error {
	return t.call("HashEnd", func() C.TPM_RESULT { return C.TPM_IO_Hash_End() })
}

// Established reports the TPM-established flag.
func (t *TPM) Established() (bool, error) {
	var b C.TPM_BOOL
	err := t.call("Established", func() C.TPM_RESULT { return C.TPM_IO_TpmEstablished_Get(&b) })
	return b != 0, err
}

// ResetEstablished clears the TPM-established flag as a request from locality
// loc would; libtpms refuses below locality 3 with ResultBadLocality. The
// locality set with SetLocality is unchanged afterwards.
func (t *TPM) ResetEstablished(loc uint8) error {
	return t.call(fmt.Sprintf("ResetEstablished(locality %d)", loc), func() C.TPM_RESULT {
		saved := C.nkp_locality
		C.nkp_locality = C.uint8_t(loc)
		defer func() { C.nkp_locality = saved }()
		return C.TPM_IO_TpmEstablished_Reset()
	})
}

// call runs f, a libtpms call needing a running TPM, under the lock.
func (t *TPM) call(op string, f func() C.TPM_RESULT) error {
	t.lock()
	defer t.unlock()
	if err := t.checkLocked(op, 1); err != nil {
		return err
	}
	if rc := f(); rc != 0 {
		return fmt.Errorf("libtpms: %s: %w", op, errors.Join(Result(rc), t.takeCallbackErr()))
	}
	return t.takeCallbackErr()
}

// Cancel asks libtpms to cancel the command in progress
// (TPMLIB_CancelCommand). It does not wait for t's lock, so it can reach a
// Process running in another goroutine; libtpms only checks the request at a
// few points of long commands (key generation), so it is best effort.
func (t *TPM) Cancel() error {
	if current.Load() != t {
		return fmt.Errorf("libtpms: Cancel: %w", ErrClosed)
	}
	if rc := C.TPMLIB_CancelCommand(); rc != 0 {
		return fmt.Errorf("libtpms: Cancel: %w", Result(rc))
	}
	return nil
}
