// Command nkp-hook is nkp's libvirt qemu hook: install it as /etc/libvirt/hooks/qemu.d/nkp
// (then SIGHUP libvirtd if it was the first hook). See package hooks for what it does and
// how it is configured.
//
// The hook is a short-lived process on the path of every VM start: the Go runtime is
// told not to start the goroutine that keeps GOMAXPROCS up to date (a hook runs one
// goroutine, and every goroutine started may wake one more thread, which must then get
// a CPU before the process can exit).
//
//go:debug updatemaxprocs=0
package main

import (
	"os"

	"github.com/nkp-dev/nkp/hooks"
)

func main() {
	os.Exit(hooks.Main(os.Args[1:], os.Stdin, os.Stderr, os.Getenv))
}
