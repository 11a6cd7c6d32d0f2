//go:build cgo

package seccomp

// With cgo the Go runtime makes its threads with glibc's pthread_create, which tries
// clone3 first: the tests then also prove the ENOSYS fallback to clone works, as in
// nkp-swtpm, which links libtpms.
import _ "runtime/cgo"
