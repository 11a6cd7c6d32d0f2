package main

import (
	"bytes"
	"io"
	"os"

	"github.com/nkp-dev/nkp/hooks/hookproto"
)

// What the entry point (entry_linux_amd64.s) leaves for main when it hands over to the Go
// runtime. They are set before the runtime starts, so they must need no initialisation
// code: prefix and the counters are zeroed by the loader, namespace is a string constant
// the linker lays out.
var (
	prefix      [prefixSize]byte // the first bytes of stdin
	prefixLen   int              // how many of them the entry read
	prefixState int              // stdinUntouched, stdinAll or stdinMore
	namespace   = hookproto.Namespace
)

// prefixSize is what the entry reads before it hands over: a domain XML is a few KiB, one
// with many devices some tens; a larger one takes the ordinary path.
const prefixSize = 1 << 20

// prefixState values. The zero value is what a binary built without the entry sees.
const (
	stdinUntouched = 0 // the entry did not run: read os.Stdin
	stdinAll       = 1 // prefix[:prefixLen] is all of stdin (end of file reached)
	stdinMore      = 2 // stdin continues after prefix[:prefixLen] (buffer full, or read failed: read it again)
)

// stdin is the domain XML as hooks.Main reads it: what the entry read, then what is left.
func stdin() io.Reader {
	switch prefixState {
	case stdinAll:
		return bytes.NewReader(prefix[:prefixLen])
	case stdinMore:
		return io.MultiReader(bytes.NewReader(prefix[:prefixLen]), os.Stdin)
	}
	return os.Stdin
}
