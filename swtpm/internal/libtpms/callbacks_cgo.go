//go:build cgo

package libtpms

// This file holds the Go functions libtpms calls back into. A file with
// //export may only declare things in its preamble, so the C trampolines that
// register them live in engine_cgo.go.

// #include <stdint.h>
// #include <libtpms/tpm_types.h>
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"unsafe"
)

// libtpms' result codes as the callbacks return them (tpm_error.h).
const (
	cSuccess C.TPM_RESULT = 0
	cFail    C.TPM_RESULT = 0x09
	cRetry   C.TPM_RESULT = 0x800
)

// callbackTPM returns the TPM the callbacks serve. The caller of the libtpms
// function that led here holds the engine's lock, so the callback may use t's
// guarded fields without locking.
func callbackTPM() *TPM { return current.Load() }

// guard turns a panic in an NVRAM implementation into TPM_FAIL: a Go panic
// must not unwind through libtpms' C frames.
func guard(t *TPM, op string, rc *C.TPM_RESULT) {
	if r := recover(); r != nil {
		t.noteCallbackErr(fmt.Errorf("NVRAM %s panicked: %v", op, r))
		*rc = cFail
	}
}

//export nkpNvramInit
func nkpNvramInit() C.TPM_RESULT {
	if callbackTPM() == nil {
		return cFail
	}
	return cSuccess
}

//export nkpNvramLoad
func nkpNvramLoad(data **C.uchar, length *C.uint32_t, name *C.char) (rc C.TPM_RESULT) {
	t := callbackTPM()
	if t == nil {
		return cFail
	}
	defer guard(t, "load", &rc)
	n := C.GoString(name)
	b, err := t.nv.Load(n)
	if errors.Is(err, fs.ErrNotExist) {
		return cRetry // libtpms manufactures a TPM when permall is missing
	}
	if err != nil {
		t.noteCallbackErr(fmt.Errorf("loading %q from NVRAM: %w", n, err))
		return cFail
	}
	defer clear(b)
	if len(b) == 0 || len(b) > MaxBlobSize {
		t.noteCallbackErr(fmt.Errorf("loading %q from NVRAM: blob of %d bytes is not a libtpms state (want 1..%d bytes)", n, len(b), MaxBlobSize))
		return cFail
	}
	// libtpms takes ownership and releases the blob with free(), which is
	// what TPM_Free does; TPM_Malloc itself refuses more than 128 KiB, less
	// than a full permall can be, so plain malloc it is.
	p := (*C.uchar)(C.malloc(C.size_t(len(b))))
	if p == nil {
		t.noteCallbackErr(fmt.Errorf("loading %q from NVRAM: out of memory for %d bytes", n, len(b)))
		return cFail
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(p)), len(b)), b)
	*data = p
	*length = C.uint32_t(len(b))
	return cSuccess
}

//export nkpNvramStore
func nkpNvramStore(data *C.uchar, length C.uint32_t, name *C.char) (rc C.TPM_RESULT) {
	t := callbackTPM()
	if t == nil {
		return cFail
	}
	defer guard(t, "store", &rc)
	n := C.GoString(name)
	b := C.GoBytes(unsafe.Pointer(data), C.int(length))
	defer clear(b)
	if err := t.nv.Store(n, b); err != nil {
		t.noteCallbackErr(fmt.Errorf("storing %q (%d bytes) to NVRAM: %w", n, len(b), err))
		return cFail
	}
	return cSuccess
}

//export nkpNvramDelete
func nkpNvramDelete(name *C.char, mustExist C.TPM_BOOL) (rc C.TPM_RESULT) {
	t := callbackTPM()
	if t == nil {
		return cFail
	}
	defer guard(t, "delete", &rc)
	n := C.GoString(name)
	err := t.nv.Delete(n)
	if err == nil || (mustExist == 0 && errors.Is(err, fs.ErrNotExist)) {
		return cSuccess
	}
	t.noteCallbackErr(fmt.Errorf("deleting %q from NVRAM: %w", n, err))
	return cFail
}

//export nkpIoInit
func nkpIoInit() C.TPM_RESULT {
	if callbackTPM() == nil {
		return cFail
	}
	return cSuccess
}

//export nkpConnCommandFailed
func nkpConnCommandFailed(h C.uintptr_t, cc, rc, n C.uint32_t) {
	connCommandFailed(uintptr(h), uint32(cc), uint32(rc), uint32(n))
}

//export nkpIoGetPhysicalPresence
func nkpIoGetPhysicalPresence(pp *C.TPM_BOOL) C.TPM_RESULT {
	*pp = 0 // a vTPM has no physical presence switch; swtpm reports none either
	return cSuccess
}
