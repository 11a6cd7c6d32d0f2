// Package vmcli is `nkpctl vm`: protect, status, rekey and unprotect, each a thin call
// to hostd's local API over its unix socket (hostd/vm/vmapi). The sentences of refusals
// come from hostd, which names the VM, the key and what to do.
//
// Importers: cmd/nkpctl.
//
// Usage: nkpctl vm protect DOMAIN | status [DOMAIN] [--json] | rekey DOMAIN |
// unprotect DOMAIN [--tpm keep|none], each with [--socket PATH] (environment
// NKP_HOSTD_SOCKET, default /run/nkp/hostd.sock); hostd's sentences are printed as
// they are.
package vmcli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

type cli struct {
	stdout io.Writer
	socket string
	asJSON bool
	tpm    string
}

// Command returns `nkpctl vm`.
func Command(stdout io.Writer) *cobra.Command {
	c := &cli{stdout: stdout}
	def := os.Getenv("NKP_HOSTD_SOCKET")
	if def == "" {
		def = vmapi.DefaultSocket
	}
	vm := &cobra.Command{Use: "vm", Short: "protect libvirt domains with nkp (talks to nkp-hostd on this host)"}
	vm.PersistentFlags().StringVar(&c.socket, "socket", def, "nkp-hostd's local API socket (env NKP_HOSTD_SOCKET)")

	protect := &cobra.Command{
		Use:   "protect DOMAIN",
		Short: "give a shut-off domain an nkp vTPM (adopting its libvirt swtpm state, if any)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := c.client().Protect(cmd.Context(), args[0])
			return c.done(v, err)
		},
	}
	status := &cobra.Command{
		Use:   "status [DOMAIN]",
		Short: "show a domain's nkp objects, key IDs and KDK versions, and its TPM's health; all protected domains without DOMAIN",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.status(cmd.Context(), args)
		},
	}
	status.Flags().BoolVar(&c.asJSON, "json", false, "print JSON")
	rekey := &cobra.Command{
		Use:   "rekey DOMAIN",
		Short: "re-encrypt a shut-off domain's vTPM state under the primary KDK version",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := c.client().Rekey(cmd.Context(), args[0])
			return c.done(v, err)
		},
	}
	unprotect := &cobra.Command{
		Use:   "unprotect DOMAIN",
		Short: "give a shut-off domain back to libvirt: its vTPM becomes libvirt's swtpm with the same state (--tpm keep), or is removed (--tpm none)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if c.tpm != vmapi.UnprotectKeep && c.tpm != vmapi.UnprotectNone {
				return fmt.Errorf("--tpm %q: want %q (libvirt's swtpm keeps the vTPM's state) or %q (the vTPM and its state are deleted)", c.tpm, vmapi.UnprotectKeep, vmapi.UnprotectNone)
			}
			v, err := c.client().Unprotect(cmd.Context(), args[0], vmapi.UnprotectRequest{TPM: c.tpm})
			return c.done(v, err)
		},
	}
	unprotect.Flags().StringVar(&c.tpm, "tpm", vmapi.UnprotectKeep, "keep | none")
	vm.AddCommand(protect, status, rekey, unprotect)
	return vm
}

func (c *cli) client() *vmapi.Client { return vmapi.NewClient(c.socket) }

func (c *cli) done(v vmapi.VM, err error) error {
	if err != nil {
		return err
	}
	if v.Note != "" {
		fmt.Fprintf(c.stdout, "%s: %s\n", v.Domain, v.Note)
	}
	c.describe(v)
	return nil
}

func (c *cli) status(ctx context.Context, args []string) error {
	cl := c.client()
	if len(args) == 1 {
		v, err := cl.Get(ctx, args[0])
		if err != nil {
			return err
		}
		if c.asJSON {
			return c.json(v)
		}
		c.describe(v)
		return nil
	}
	l, err := cl.List(ctx)
	if err != nil {
		return err
	}
	if c.asJSON {
		return c.json(l)
	}
	if len(l.VMs) == 0 {
		fmt.Fprintln(c.stdout, "no protected domains on this host")
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tUUID\tSTATE\tTPM\tVTPM KEY ID\tKDK\tPROBLEMS")
	for _, v := range l.VMs {
		key, kdkv := "-", "-"
		for _, o := range v.Objects {
			if o.Name == "vtpm" {
				key, kdkv = o.KeyID, fmt.Sprint(o.KDKVersion)
				if !o.Primary {
					kdkv += " (not primary)"
				}
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\n", v.Domain, v.UUID, state(v), orDash(v.TPM), key, kdkv, len(v.Problems))
	}
	return tw.Flush()
}

func (c *cli) describe(v vmapi.VM) {
	w := c.stdout
	if !v.Protected {
		fmt.Fprintf(w, "%s (%s): not protected by nkp, %s\n", v.Domain, v.UUID, state(v))
	} else {
		fmt.Fprintf(w, "%s (%s): protected, keys from provider %s, %s", v.Domain, v.UUID, v.ProviderID, state(v))
		if v.TPM != "" {
			fmt.Fprintf(w, ", TPM %s", v.TPM)
		}
		fmt.Fprintln(w)
	}
	for _, o := range v.Objects {
		p := "primary"
		if !o.Primary {
			p = "not primary: nkpctl vm rekey " + v.Domain
		}
		fmt.Fprintf(w, "  %-10s key %s  KDK version %d (%s)\n", o.Name, o.KeyID, o.KDKVersion, p)
	}
	for _, p := range v.Problems {
		fmt.Fprintf(w, "  problem: %s\n", p)
	}
}

func state(v vmapi.VM) string {
	if v.Running {
		return "running"
	}
	return "shut off"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	if i := strings.IndexByte(s, ':'); i > 0 {
		return s[:i]
	}
	return s
}

func (c *cli) json(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
