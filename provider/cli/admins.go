package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
)

// adminsCmd is `nkpctl provider admins [add|revoke]`: administrator certificates.
func (c *ctl) adminsCmd() *cobra.Command {
	adm := &cobra.Command{
		Use:   "admins",
		Short: "list administrator certificates (add, revoke)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, (*client.Client).Admins, adminsTable)
		},
	}
	var out string
	add := &cobra.Command{
		Use:   "add NAME --out DIR",
		Short: "issue an administrator certificate for a new key; writes DIR/admin.crt, DIR/admin.key (0600) and DIR/ca.crt",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("--out DIR is required: the new admin's files go there (give it to that admin; nkpctl uses it with --dir DIR)")
			}
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				return c.addAdmin(ctx, cl, args[0], out)
			})
		},
	}
	add.Flags().StringVarP(&out, "out", "o", "", "directory for the new admin's files (created 0700)")
	revoke := &cobra.Command{
		Use:   "revoke NAME|SERIAL",
		Short: "revoke an administrator certificate (by serial) or every live one of an admin (by name), on every replica at once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				return c.revokeAdmin(ctx, cl, args[0])
			})
		},
	}
	adm.AddCommand(add, revoke)
	return adm
}

// addAdmin issues a certificate for a new key for admin name and writes its files to out.
func (c *ctl) addAdmin(ctx context.Context, cl *client.Client, name, out string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("add admin %s: generating a key: %w", name, err)
	}
	cert, err := cl.AddAdmin(ctx, name, key)
	if err != nil {
		return err
	}
	caCert, err := daemon.LoadCACert(c.pick(c.caFile, daemon.CACertFile))
	if err != nil {
		return err
	}
	serial := cert.Leaf.SerialNumber.Text(16)
	if err := daemon.WriteAdminDir(out, caCert, cert.Certificate[0], key); err != nil {
		return fmt.Errorf("admin %s was issued certificate %s but its files could not be written: %w (revoke it with `nkpctl provider admins revoke %s` and add it again)",
			name, serial, err, serial)
	}
	fmt.Fprintf(c.stderr, "admin %s: certificate %s (valid until %s) written to %s; use it with `nkpctl provider --dir %s …`\n",
		name, serial, cert.Leaf.NotAfter.UTC().Format(time.RFC3339), out, out)
	return nil
}

// revokeAdmin revokes admin certificate ref (a name or a serial) and says which went.
func (c *ctl) revokeAdmin(ctx context.Context, cl *client.Client, ref string) error {
	as, err := cl.RevokeAdmin(ctx, ref)
	if err != nil {
		return err
	}
	if len(as) == 0 && !c.asJSON {
		fmt.Fprintf(c.stderr, "admin %s: already revoked\n", ref)
		return nil
	}
	for _, a := range as {
		fmt.Fprintf(c.stderr, "admin %s certificate %s revoked\n", a.Name, a.Serial)
	}
	if c.asJSON {
		return c.print(as, func(w io.Writer) { adminsTable(w, as) })
	}
	return nil
}

// adminsTable is the human form of a list of admin certificates.
func adminsTable(w io.Writer, as []apiv1.Admin) {
	fmt.Fprintln(w, "NAME\tSERIAL\tISSUED\tNOT AFTER\tREVOKED")
	for _, a := range as {
		name, issued, notAfter, revoked := a.Name, "-", "-", "false"
		if name == "" {
			name = "(unrecorded)"
		}
		if !a.Issued.IsZero() {
			issued = a.Issued.UTC().Format(time.RFC3339)
		}
		if !a.NotAfter.IsZero() {
			notAfter = a.NotAfter.UTC().Format(time.RFC3339)
		}
		if a.Revoked {
			revoked = a.RevokedAt.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", name, a.Serial, issued, notAfter, revoked)
	}
}
