package swtpm

import (
	"log/slog"
	"time"

	"github.com/nkp-dev/nkp/swtpm/internal/idletrim"
)

// DefaultIdleTrim is the idle time after which nkp-swtpm trims (Config.IdleTrim).
const DefaultIdleTrim = 2 * time.Second

// maxIdleCheck caps the wait between two looks at the activity count of a TPM that
// stays idle, so an idle process wakes about once a minute.
const maxIdleCheck = 64 * time.Second

// dataLoopCounter is implemented by an engine whose own data loop counts its
// commands (*libtpms.TPM).
type dataLoopCounter interface {
	DataLoopCommands() uint64
}

// activityCount returns a count that grows with every control request and data command.
func (s *Server) activityCount() uint64 {
	n := s.activity.Load()
	if c, ok := s.cfg.Engine.(dataLoopCounter); ok {
		n += c.DataLoopCommands()
	}
	return n
}

// trimWhenIdle runs until the server stops. Every cfg.IdleTrim it compares the
// activity count with the last look; once a whole wait passed without activity it
// trims (package idletrim), then looks again after a wait that doubles up to
// maxIdleCheck while the TPM stays idle. It trims again only after activity, and any
// activity starts the waits over at cfg.IdleTrim.
func (s *Server) trimWhenIdle() {
	trim := s.trim
	if trim == nil {
		trim = idletrim.NewTrimmer().Trim
	}
	wait := s.cfg.IdleTrim
	last := s.activityCount()
	trimmed := false // no activity since the last trim
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		if n := s.activityCount(); n != last {
			last, trimmed, wait = n, false, s.cfg.IdleTrim
		} else {
			if !trimmed {
				res, err := trim()
				if s.log.Enabled(s.ctx, slog.LevelDebug) {
					if err != nil {
						s.log.Debug("idle trim incomplete", "err", err)
					}
					s.log.Debug("idle trim", "unmapped_kib", res.KiB, "mappings", res.Regions)
				}
				trimmed = true
			}
			wait = min(2*wait, maxIdleCheck)
		}
		t.Reset(wait)
	}
}
