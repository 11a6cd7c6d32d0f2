// Command nkp-swtpm is a vTPM 2.0 backend over libtpms that QEMU, libvirt and the swtpm
// tools accept in place of swtpm: `nkp-swtpm socket [swtpm options]`. See package
// github.com/nkp-dev/nkp/swtpm/cli for the options.
//
// It runs with GOMAXPROCS=1 (see swtpm/internal/oneproc, linked through swtpm/cli): the
// data channel is served by libtpms' C loop, so more Ps would only cost memory; the
// runtime must not raise it later either.
//
// make build builds it with GOEXPERIMENT=nogreenteagc (Go 1.26's previous GC): the
// Green Tea GC's per-span mark bits cost an idle vTPM about 55 KB of memory, and its
// small Go heap gains nothing from the faster marking. `go version -m nkp-swtpm`
// shows the setting. It also links libtpms and libcrypto into the binary (-tags
// nkpstatic; make build-shared does not), the objects that run until a vTPM is idle
// placed first (hot.ld): how their security updates then reach a vTPM, and the
// layout, are in go doc ./swtpm/internal/libtpms (Linking).
//
//go:debug updatemaxprocs=0
package main

import (
	"os"

	"github.com/nkp-dev/nkp/swtpm/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }
