//go:build cgo && !nkpstatic

package libtpms

// The default build: libtpms.so.0 and libcrypto.so.3 are loaded at start.
const linkedStatic = false
