// Command nkpctl is nkp's command-line tool. `nkpctl provider …` runs and administers the
// key provider (package github.com/nkp-dev/nkp/provider/cli); `nkpctl vm …` protects libvirt
// domains through this host's nkp-hostd (package github.com/nkp-dev/nkp/hostd/vm/vmcli).
// A word that is not a command (`nkpctl vm protet DOMAIN`) is an error, exit status 1.
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
	err := newRoot().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "nkpctl:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "nkpctl",
		Short:         "nkp's command-line tool",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(providercli.Command(os.Stdin, os.Stdout, os.Stderr), vmcli.Command(os.Stdout))
	strictGroups(root)
	return root
}

// strictGroups makes every command that only groups others (nkpctl vm, nkpctl provider,
// …) refuse an unknown word: cobra otherwise prints the group's help and exits 0, so a
// script's mistyped `nkpctl vm protet DOMAIN` would seem to succeed. Without a word the
// group still prints its help.
func strictGroups(c *cobra.Command) {
	for _, sub := range c.Commands() {
		strictGroups(sub)
	}
	if !c.HasSubCommands() || c.Runnable() {
		return
	}
	c.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("unknown command %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
		}
		return nil
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
}
