package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
)

// auditPruneCmd is `nkpctl provider audit prune --before TIME [--yes]`.
func (c *ctl) auditPruneCmd() *cobra.Command {
	var beforeFlag string
	var yes bool
	cmd := &cobra.Command{
		Use:   "prune --before TIME [--yes]",
		Short: "delete the audit records dated before TIME (never those after the newest confirmed backup's anchor); without --yes only shows what would go",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if beforeFlag == "" {
				return errors.New("--before TIME is required (RFC 3339, e.g. 2026-11-01T00:00:00Z, or a date 2026-11-01 meaning its midnight UTC)")
			}
			before, err := parseTime(beforeFlag)
			if err != nil {
				return err
			}
			prune := func(cl *client.Client, ctx context.Context) (apiv1.AuditPruneResponse, error) {
				return cl.PruneAudit(ctx, before, !yes)
			}
			return show(c, cmd, prune, func(w io.Writer, res apiv1.AuditPruneResponse) {
				switch {
				case res.Deleted == 0:
					fmt.Fprintf(w, "no audit record before %s can go (the newest confirmed backup anchors record %d)\n", before.Format(time.RFC3339Nano), res.Anchor)
				case res.DryRun:
					fmt.Fprintf(w, "would delete audit records through %d (%d records dated before %s); record %d (the newest confirmed backup's anchor) and later stay\n"+
						"export them first if you keep them (`nkpctl provider audit -n 0 --json > audit.json`), then run again with --yes\n",
						res.Through, res.Deleted, before.Format(time.RFC3339Nano), res.Anchor)
				default:
					fmt.Fprintf(w, "deleted audit records through %d (%d records); a prune record names the new base, `audit verify` checks the rest\n", res.Through, res.Deleted)
				}
			})
		},
	}
	cmd.Flags().StringVar(&beforeFlag, "before", "", "delete records dated before this time (RFC 3339, or YYYY-MM-DD = midnight UTC)")
	cmd.Flags().BoolVar(&yes, "yes", false, "really delete (without it: a dry run)")
	return cmd
}

// parseTime reads an RFC 3339 time or a YYYY-MM-DD date (midnight UTC).
func parseTime(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("--before %q: want an RFC 3339 time (2026-11-01T00:00:00Z) or a date (2026-11-01)", s)
}
