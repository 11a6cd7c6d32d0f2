package audit

import (
	"context"
	"log/slog"
	"sort"
)

// Log writes rec to log as one structured line, message "audit", at level Info: seq,
// kind, actor, subject and the details as a group. Call it after the transaction that
// appended rec committed (an Update may run its function more than once).
func Log(ctx context.Context, log *slog.Logger, rec Record) {
	if log == nil {
		return
	}
	attrs := []slog.Attr{
		slog.Uint64("seq", rec.Seq),
		slog.String("kind", string(rec.Kind)),
		slog.String("actor", rec.Actor),
		slog.String("subject", rec.Subject),
	}
	if len(rec.Details) > 0 {
		names := make([]string, 0, len(rec.Details))
		for k := range rec.Details {
			names = append(names, k)
		}
		sort.Strings(names)
		d := make([]any, 0, len(names))
		for _, k := range names {
			d = append(d, slog.String(k, rec.Details[k]))
		}
		attrs = append(attrs, slog.Group("details", d...))
	}
	log.LogAttrs(ctx, slog.LevelInfo, "audit", attrs...)
}
