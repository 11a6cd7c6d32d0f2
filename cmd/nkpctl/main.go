// Command nkpctl is nkp's command-line tool. `nkpctl provider …` runs and administers the
// key provider (package github.com/nkp-dev/nkp/provider/cli).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	providercli "github.com/nkp-dev/nkp/provider/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	root := &cobra.Command{
		Use:           "nkpctl",
		Short:         "nkp's command-line tool",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(providercli.Command(os.Stdin, os.Stdout, os.Stderr))
	err := root.ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "nkpctl:", err)
		os.Exit(1)
	}
}
