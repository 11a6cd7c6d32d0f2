package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
)

// errNoEngine is returned until the vTPM server of package swtpm is wired in.
var errNoEngine = errors.New("the vTPM server (package swtpm) is not wired into nkp-swtpm yet")

// serve opens the state and the sockets, starts the vTPM server, calls ready once
// clients can connect and serves until ctx ends or the server stops.
func serve(ctx context.Context, o *Options, log *slog.Logger, ready func() error) error {
	return errNoEngine
}

// printStates prints the state blobs of --tpmstate as swtpm --print-states does.
func printStates(o *Options, w io.Writer) error {
	return fmt.Errorf("--print-states: %w", errNoEngine)
}
