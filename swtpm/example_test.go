package swtpm_test

import (
	"context"
	"log"
	"log/slog"
	"net"
	"os"
	"os/signal"

	"github.com/nkp-dev/nkp/swtpm"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
	"github.com/nkp-dev/nkp/swtpm/state"
)

// A vTPM for QEMU on /run/vm1/ctrl.sock, its state in /var/lib/vm1/tpm2 encrypted under
// a key read from an inherited fd: what `nkp-swtpm socket --tpm2 --ctrl
// type=unixio,path=/run/vm1/ctrl.sock --tpmstate dir=/var/lib/vm1/tpm2 --key fd=3
// --terminate` does (swtpm/cli builds the same from the command line).
func Example() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	spec, err := state.ParseKeySpec("fd=3,mode=aes-256-cbc,format=binary")
	if err != nil {
		log.Fatal(err)
	}
	key, err := state.ParseKey(spec, logger)
	if err != nil {
		log.Fatal(err)
	}
	defer key.Wipe()
	dir, err := state.Open("/var/lib/vm1/tpm2", state.Options{Key: key, Mode: 0o600, Log: logger})
	if err != nil {
		log.Fatal(err)
	}
	defer dir.Close()
	tpm, err := libtpms.Open(dir)
	if err != nil {
		log.Fatal(err)
	}
	defer tpm.Close()
	ctrl, err := net.Listen("unix", "/run/vm1/ctrl.sock")
	if err != nil {
		log.Fatal(err)
	}
	srv, err := swtpm.New(swtpm.Config{
		Engine:       tpm,
		Store:        dir,
		Log:          logger,
		CtrlListener: ctrl,        // QEMU connects here and passes the data channel by SET_DATAFD
		Terminate:    true,        // end when QEMU's data channel goes away
		StateKey:     key.Bytes(), // for GET_CONFIG and the migration envelope
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := srv.Serve(ctx); err != nil { // TPM2_Shutdown is sent before it returns
		log.Fatal(err)
	}
}
