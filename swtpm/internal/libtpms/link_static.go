//go:build cgo && nkpstatic

package libtpms

// Built with -tags nkpstatic: libtpms.a and libcrypto.a are in the binary.
const linkedStatic = true
