//go:build !cgo

package libtpms

// Linked reports nothing linked: without cgo there is no libtpms.
func Linked() LinkInfo { return LinkInfo{} }
