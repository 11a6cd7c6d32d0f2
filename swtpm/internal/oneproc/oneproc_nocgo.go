//go:build !cgo

package oneproc

// Without cgo there is no constructor: the runtime sizes itself as usual.
func narrowed() bool        { return false }
func restore(tid int) error { return nil }

// mallocArenas reports -1: without cgo there is no C allocator to ask.
func mallocArenas() int { return -1 }
