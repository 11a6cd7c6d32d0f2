package swtpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/data"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
)

// TPM2_SU values of TPM2_Startup and TPM2_Shutdown.
const (
	suClear uint16 = 0
	suState uint16 = 1
)

// suCommand builds TPM2_Startup or TPM2_Shutdown with a TPM_SU argument.
func suCommand(cc uint32, su uint16) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint16(b, data.TagNoSessions)
	binary.BigEndian.PutUint32(b[2:], 12)
	binary.BigEndian.PutUint32(b[6:], cc)
	binary.BigEndian.PutUint16(b[10:], su)
	return b
}

// resultOf maps an engine error to the control channel's result code: libtpms' own
// code when it refused, FAIL otherwise.
func resultOf(err error) ctrl.Result {
	if err == nil {
		return ctrl.ResSuccess
	}
	var r libtpms.Result
	if errors.As(err, &r) && r != 0 {
		return ctrl.Result(r)
	}
	return ctrl.ResFail
}

// startAtLaunchLocked starts the TPM without CMD_INIT (--flags not-need-init, startup-*).
func (s *Server) startAtLaunchLocked() error {
	if err := s.startTPMLocked(0); err != nil {
		return fmt.Errorf("vTPM: start the TPM at launch (--flags not-need-init): %w", err)
	}
	var su uint16
	switch s.cfg.Startup {
	case StartupNone:
		return nil
	case StartupClear:
		su = suClear
	case StartupState:
		su = suState
	}
	resp := s.processLocked(suCommand(data.CCStartup, su))
	if rc := data.ResponseCode(resp); rc != data.RCSuccess {
		s.stopTPMLocked("startup failed")
		return fmt.Errorf("vTPM: TPM2_Startup(%s) at launch failed with TPM rc 0x%x (startup-state needs a state saved by TPM2_Shutdown(STATE); try startup-clear)", s.cfg.Startup, rc)
	}
	return nil
}

// startTPMLocked does the work of CMD_INIT after the TPM was stopped: it starts the
// TPM from the blobs set by SET_STATEBLOB or from the store (libtpms stores a migrated
// permanent state through the store as it starts), and applies DELETE_VOLATILE.
func (s *Server) startTPMLocked(flags uint32) error {
	if err := s.cfg.Engine.MainInit(); err != nil {
		return fmt.Errorf("start the TPM: %w", err)
	}
	if flags&ctrl.InitDeleteVolatile != 0 {
		if err := s.cfg.Store.Delete(libtpms.Volatile.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.cfg.Engine.Terminate()
			return fmt.Errorf("delete the volatile state (INIT with DELETE_VOLATILE): %w", err)
		}
	}
	s.running = true
	s.lastCmd = 0
	return nil
}

// stopTPMLocked sends the automatic TPM2_Shutdown and stops the TPM, if it runs.
func (s *Server) stopTPMLocked(why string) {
	if !s.running {
		return
	}
	s.autoShutdownLocked(why)
	s.cfg.Engine.Terminate()
	s.running = false
}

// autoShutdownLocked sends TPM2_Shutdown(SU_STATE), falling back to SU_CLEAR, when the
// last command was not a TPM2_Shutdown (swtpm ≥ 0.8, PR #701: keeps the dictionary
// attack counter from growing at every reset or exit).
func (s *Server) autoShutdownLocked(why string) {
	if s.cfg.DisableAutoShutdown || s.lastCommandLocked() == data.CCShutdown {
		return
	}
	if s.lockReleased {
		// The state now belongs to the migration destination: saving ours over it
		// would be refused by the store, and must not happen anyway.
		s.log.Info("no automatic TPM2_Shutdown: the state lock went to the migration destination", "before", why)
		return
	}
	for _, su := range []uint16{suState, suClear} {
		resp := s.processLocked(suCommand(data.CCShutdown, su))
		rc := data.ResponseCode(resp)
		if rc == data.RCSuccess {
			s.log.Debug("automatic TPM2_Shutdown", "su", su, "before", why)
			return
		}
		if rc == data.RCInitialize {
			return // no TPM2_Startup yet: nothing to shut down
		}
	}
}

// lastCommandLocked returns the command code of the last TPM command since the TPM
// started, wherever it came from.
func (s *Server) lastCommandLocked() uint32 {
	if s.cs != nil {
		return s.cs.LastCommand()
	}
	return s.lastCmd
}

// processLocked runs one TPM command and returns its response; engine failures become
// the TPM_RC_FAILURE response (the command is then not acknowledged).
func (s *Server) processLocked(cmd []byte) []byte {
	resp, err := s.cfg.Engine.Process(cmd)
	if len(cmd) >= data.HeaderSize {
		s.lastCmd = binary.BigEndian.Uint32(cmd[6:])
	}
	if err != nil {
		s.log.Error("TPM command failed", "cc", fmt.Sprintf("0x%x", s.lastCmd), "err", err)
		return data.NotRunningResponse()
	}
	return resp
}
