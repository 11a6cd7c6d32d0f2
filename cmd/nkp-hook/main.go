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
// 143; 3 system calls against 199, no thread started). When stdin is larger than 1 MiB
// or cannot be read, it starts the Go runtime as usual and main hands hooks.Run what was
// read.
//
// For nkp's domains the entry also asks hostd itself, when the Go path would do exactly
// the same: exactly the four arguments libvirt passes, the first not a flag, all
// printable ASCII (at most hookproto.MaxName bytes) and an ASCII domain XML; no NKP_HOOK_*
// variable in the environment; no config file (one stat(2) says ENOENT). It then sends
// the request in hookproto's binary framing to the default socket over a blocking unix
// socket with the Go path's timeouts (SO_SNDTIMEO/SO_RCVTIMEO set to what is left of
// the 30 s, or 5 s for operations that are not hookproto.Required, before each call),
// and reads the reply's first 10 bytes: if they are hookproto.ReplyAllow (allow, no
// message) the process exits 0, without the Go runtime. Anything else — a refusal, a
// message, a connect, send or receive error, a timeout, a short or garbled reply —
// starts the runtime with what happened recorded (the failing stage and errno, the
// reply bytes read, the socket); main passes it to hooks.Run as an Exchange, which
// decides from it with hooks' usual policy (a Required operation fails closed) and never
// sends the request again (hostd may have acted on it). A check that fails leaves it all
// to Go, nothing sent. The defaults (socket, config file, timeouts) are strings the
// linker lays out, which -ldflags=-X can point elsewhere (tests do).
//
// Built without -E (plain go build), the entry is left out and main reads stdin and asks
// hostd itself: the same behaviour, slower.
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
	os.Exit(hooks.Run(os.Args[1:], stdin(), os.Stderr, os.Getenv, options()))
}
