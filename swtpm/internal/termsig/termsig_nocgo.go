//go:build !cgo

package termsig

import "errors"

func install() (int, error) {
	return -1, errors.New("termsig: built without cgo, so the signal handlers cannot be installed")
}

func uninstall() {}
