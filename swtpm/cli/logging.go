package cli

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// openLog returns the logger --log asks for and a function that closes its file.
// Without --log it logs to stderr; file=- discards everything. A log file is created
// with mode 0600 and appended to unless truncate is given. Level 0 or 1 logs Info and
// above, level 2 and higher also Debug.
func openLog(l *cmdline.LogOptions, stderr io.Writer) (*slog.Logger, func(), error) {
	noop := func() {}
	if l == nil {
		return newLogger(stderr, "", slog.LevelInfo), noop, nil
	}
	level := slog.LevelInfo
	if l.Level >= 2 {
		level = slog.LevelDebug
	}
	switch {
	case l.File == "-":
		return slog.New(slog.DiscardHandler), noop, nil
	case l.File != "":
		flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if l.Truncate {
			flags = os.O_WRONLY | os.O_CREATE
		}
		f, err := openNoFollow("--log file=", l.File, flags, 0o600)
		if err != nil {
			return nil, nil, err
		}
		if l.Truncate {
			if err := f.Truncate(0); err != nil {
				f.Close()
				return nil, nil, fmt.Errorf("--log file=%s: truncate: %w", l.File, err)
			}
		}
		return newLogger(f, l.Prefix, level), func() { f.Close() }, nil
	case l.FD == 1 || l.FD == 2:
		w := stderr
		if l.FD == 1 {
			w = os.Stdout
		}
		return newLogger(w, l.Prefix, level), noop, nil
	case l.FD >= 3:
		f := os.NewFile(uintptr(l.FD), "log")
		if _, err := f.Stat(); err != nil {
			return nil, nil, fmt.Errorf("--log fd=%d: not an open file: %w", l.FD, err)
		}
		if l.Truncate {
			f.Truncate(0) // a pipe cannot be truncated; that is fine
		}
		return newLogger(f, l.Prefix, level), func() { f.Close() }, nil
	}
	return newLogger(stderr, l.Prefix, level), noop, nil
}

func newLogger(w io.Writer, prefix string, level slog.Level) *slog.Logger {
	if prefix != "" {
		w = &prefixWriter{w: w, prefix: []byte(prefix)}
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// prefixWriter puts prefix before every line; slog's handlers write one record per Write.
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix []byte
}

// Write implements io.Writer: one prefixed line per line of b, in one write.
func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var buf bytes.Buffer
	for _, line := range bytes.SplitAfter(b, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		buf.Write(p.prefix)
		buf.Write(line)
	}
	if _, err := p.w.Write(buf.Bytes()); err != nil {
		return 0, err
	}
	return len(b), nil
}
