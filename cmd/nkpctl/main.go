// Command nkpctl is nkp's command-line tool. `nkpctl provider …` runs and administers the
// key provider: init and restore act on a provider directory directly; every other
// command talks to a running nkp-provider over mTLS with the admin certificate that init
// wrote into that directory.
//
// Passphrases are never taken from the command line: --passphrase-file FILE,
// --passphrase-stdin, or a prompt on the terminal.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "nkpctl:", err)
		os.Exit(1)
	}
}

// run executes one nkpctl command line.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	root := newRoot(stdin, stdout, stderr)
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}
