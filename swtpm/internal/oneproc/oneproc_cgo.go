//go:build cgo

package oneproc

// int nkp_oneproc_narrowed(void);
// int nkp_oneproc_restore(int tid);
// int nkp_oneproc_arenas(void);
import "C"

import "syscall"

func narrowed() bool { return C.nkp_oneproc_narrowed() != 0 }

func restore(tid int) error {
	if e := C.nkp_oneproc_restore(C.int(tid)); e != 0 {
		return syscall.Errno(e)
	}
	return nil
}

// mallocArenas mallocs on the calling thread and returns the number of glibc malloc
// arenas, -1 if malloc_info failed.
func mallocArenas() int { return int(C.nkp_oneproc_arenas()) }
