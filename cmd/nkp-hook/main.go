// Command nkp-hook is nkp's libvirt qemu hook: install it as /etc/libvirt/hooks/qemu.d/nkp
// (then SIGHUP libvirtd if it was the first hook). See package hooks for what it does and
// how it is configured.
package main

import (
	"os"

	"github.com/nkp-dev/nkp/hooks"
)

func main() {
	os.Exit(hooks.Main(os.Args[1:], os.Stdin, os.Stderr, os.Getenv))
}
