package virt

/*
#cgo pkg-config: libvirt
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

// nkp_secret_set_value sets the value of the secret uuid on conn. On failure it returns
// -1 with libvirt's error code and message (read on this thread, where libvirt keeps
// them) copied into code and msg.
static int nkp_secret_set_value(virConnectPtr conn, const char *uuid, const unsigned char *value, size_t n,
                                int *code, char *msg, size_t msglen) {
	virSecretPtr s = virSecretLookupByUUIDString(conn, uuid);
	int r = -1;
	if (s) {
		r = virSecretSetValue(s, value, n, 0);
	}
	if (r < 0) {
		virErrorPtr e = virGetLastError();
		*code = e ? e->code : 0;
		snprintf(msg, msglen, "%s", e && e->message ? e->message : "unknown libvirt error");
	}
	if (s) {
		virSecretFree(s);
	}
	return r;
}
*/
import "C"

import (
	"unsafe"

	"libvirt.org/go/libvirt"
)

// setSecretValue calls virSecretSetValue with value itself (libvirt.org/go/libvirt's
// Secret.SetValue copies the value into a Go buffer that it leaves for the garbage
// collector, unwiped). libvirt's client library copies the value into its RPC message
// and frees it; nkp cannot reach that copy.
func setSecretValue(conn *libvirt.Connect, uuid string, value []byte) error {
	raw, err := conn.RawPtr()
	if err != nil {
		return err
	}
	defer libvirt.CloseRawPtr(raw)
	cu := C.CString(uuid)
	defer C.free(unsafe.Pointer(cu))
	var code C.int
	var msg [512]C.char
	var p *C.uchar
	if len(value) > 0 {
		p = (*C.uchar)(unsafe.Pointer(&value[0]))
	}
	if C.nkp_secret_set_value((C.virConnectPtr)(unsafe.Pointer(raw)), cu, p, C.size_t(len(value)), &code, &msg[0], C.size_t(len(msg))) < 0 {
		return libvirt.Error{Code: libvirt.ErrorNumber(code), Message: C.GoString(&msg[0]), Level: libvirt.ERR_ERROR}
	}
	return nil
}
