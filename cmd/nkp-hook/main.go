// Command nkp-hook is nkp's libvirt qemu hook: install it as /etc/libvirt/hooks/qemu.d/nkp
// (then SIGHUP libvirtd if it was the first hook). See package hooks for what it does and
// how it is configured.
//
// The hook is a short-lived process on the path of every VM start, nkp's or not. Built
// as `make build` does on linux/amd64 (go build -ldflags=-E=main.entry), the process
// starts in a few instructions of assembly (entry_linux_amd64.s) that read stdin and,
// when the domain XML does not mention nkp's namespace, exit 0 at once: package hooks'
// fast path without the Go runtime, its threads and their page faults (per run, perf
// stat -r 300 of `sh -c 'exec HOOK … <plain.xml'`: 0.55 ms of CPU, 0 context switches and
// 69 page faults, sh's included; with the runtime 1.5 ms, 12 and 273; cat 1.5 ms, 0 and
// 143; 3 system calls against 199, no thread started). Otherwise, or when
// stdin is larger than 1 MiB or cannot be read, it starts the Go runtime as usual and
// main hands hooks.Main what was read. Built without that flag (plain go build), the
// entry is left out and main reads stdin itself: the same behaviour, slower.
//
// When the runtime does start, it is told not to start the goroutine that keeps
// GOMAXPROCS up to date (a hook runs one goroutine, and every goroutine started may wake
// one more thread, which must then get a CPU before the process can exit).
//
//go:debug updatemaxprocs=0
package main

import (
	"os"

	"github.com/nkp-dev/nkp/hooks"
)

func main() {
	os.Exit(hooks.Main(os.Args[1:], stdin(), os.Stderr, os.Getenv))
}
