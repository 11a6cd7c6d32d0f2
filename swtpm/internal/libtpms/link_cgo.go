//go:build cgo

package libtpms

// #include <openssl/crypto.h>
// #include <libtpms/tpm_library.h>
import "C"

import "fmt"

// Linked says which libtpms and OpenSSL the process runs and whether they are part
// of the binary (build tag nkpstatic) or Debian's shared libraries.
func Linked() LinkInfo {
	v := uint32(C.TPMLIB_GetVersion())
	return LinkInfo{
		Static:  linkedStatic,
		Libtpms: fmt.Sprintf("%d.%d.%d", v>>16&0xff, v>>8&0xff, v&0xff),
		OpenSSL: C.GoString(C.OpenSSL_version(C.OPENSSL_VERSION)),
	}
}
