//go:build cgo

package termsig

// #include <errno.h>
// int nkp_termsig_install(int *rfd);
// void nkp_termsig_uninstall(void);
import "C"

import (
	"fmt"
	"syscall"
)

func install() (int, error) {
	var rfd C.int
	switch e := C.nkp_termsig_install(&rfd); {
	case e == C.EBUSY:
		return -1, ErrInUse
	case e != 0:
		return -1, fmt.Errorf("termsig: install the handlers of SIGTERM, SIGINT and SIGHUP: %w", syscall.Errno(e))
	}
	return int(rfd), nil
}

func uninstall() { C.nkp_termsig_uninstall() }
