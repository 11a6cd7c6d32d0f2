// Command nkpctl is nkp's command-line tool. `nkpctl provider …` runs and administers the
// key provider (package github.com/nkp-dev/nkp/provider/cli); `nkpctl vm …` protects libvirt
// domains through this host's nkp-hostd (package github.com/nkp-dev/nkp/hostd/vm/vmcli).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/nkp-dev/nkp/hostd/vm/vmcli"
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
	root.AddCommand(providercli.Command(os.Stdin, os.Stdout, os.Stderr), vmcli.Command(os.Stdout))
	err := root.ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "nkpctl:", err)
		os.Exit(1)
	}
}
