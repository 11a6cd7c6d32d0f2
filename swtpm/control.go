package swtpm

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
)

// serveCtrl serves the control channel: the one connection of CtrlConn, or the clients
// of CtrlListener one at a time.
func (s *Server) serveCtrl() {
	if s.cfg.CtrlConn != nil {
		if s.track(s.cfg.CtrlConn) {
			s.serveCtrlConn(s.cfg.CtrlConn)
		}
		s.ctrlGone.Store(true)
		switch {
		case s.cfg.CtrlTerminate:
			s.requestStop("control connection closed (--ctrl ...,terminate)")
		case !s.dataReachable():
			s.requestStop("control connection (clientfd) closed and no data channel is left")
		}
		return
	}
	s.accept(s.cfg.CtrlListener, "control", func(c net.Conn) {
		s.serveCtrlConn(c)
		if s.cfg.CtrlTerminate {
			s.requestStop("control connection closed (--ctrl ...,terminate)")
		}
	})
}

// dataReachable reports whether a data client can still reach the TPM.
func (s *Server) dataReachable() bool {
	s.tpmMu.Lock()
	defer s.tpmMu.Unlock()
	return s.cfg.DataListener != nil || s.dataFD != nil || s.dataConnOpen
}

// serveCtrlConn reads requests from one control client and answers them until the
// client goes away, a request breaks the stream, or the server stops.
func (s *Server) serveCtrlConn(c net.Conn) {
	defer s.untrack(c)
	buf := make([]byte, ctrl.ReadBuffer)
	for {
		msg, fds, err := s.readCtrlMsg(c, buf)
		if err != nil {
			closeFDs(fds)
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !s.stopping() {
				s.log.Warn("control connection lost", "err", err)
			}
			return
		}
		var resp []byte
		var after func()
		closeConn := false
		req, perr := msg.req, msg.perr
		if perr != nil {
			resp = s.refuse(perr).Marshal()
			closeConn = perr.Close
			s.log.Warn("control request refused", "err", perr)
		} else {
			var r ctrl.Response
			r, after = s.execCtrl(req, fds)
			resp = r.Marshal()
		}
		closeFDs(fds) // fds not taken by SET_DATAFD
		werr := s.writeAll(c, resp)
		// State blobs cross this channel, in the clear without a migration key.
		clear(msg.raw)
		clear(resp)
		if err := werr; err != nil {
			s.log.Warn("control response not sent; closing the connection", "err", err)
			if after != nil {
				after()
			}
			return
		}
		if after != nil {
			after()
		}
		if closeConn || s.stopping() {
			return
		}
	}
}

// ctrlMsg is one framed control message: a request, or a refusal.
type ctrlMsg struct {
	req  ctrl.Request
	perr *ctrl.ParseError
	raw  []byte // the bytes read, wiped once the request was answered
}

// readCtrlMsg reads one control message. Waiting for its first bytes is unbounded (an
// idle client); once they arrived, every further read must bring bytes within
// MessageTimeout, else the connection is closed without a reply or the request is
// answered BAD_PARAMETER, as swtpm does for that command (ctrl.Incomplete). Like swtpm
// it reads what is available, so padding sent with a request is consumed with it. SCM_RIGHTS fds that
// came with the message are returned; the caller closes those it does not keep.
func (s *Server) readCtrlMsg(c net.Conn, buf []byte) (ctrlMsg, []int, error) {
	n, fds, err := readWithRights(c, buf)
	if n <= 0 { // ReadMsgUnix reports -1 with some errors
		if err == nil {
			err = io.EOF
		}
		return ctrlMsg{}, fds, err
	}
	b := buf[:n]
	defer c.SetReadDeadline(time.Time{})
	for {
		req, need, err := ctrl.Parse(b)
		if err != nil {
			var pe *ctrl.ParseError
			if !errors.As(err, &pe) {
				pe = &ctrl.ParseError{Result: ctrl.ResBadParameter, Reason: err.Error(), Close: true}
			}
			return ctrlMsg{perr: pe, raw: b}, fds, nil
		}
		if req != nil {
			return ctrlMsg{req: req, raw: b}, fds, nil
		}
		if need > cap(b) {
			nb := make([]byte, len(b), need)
			copy(nb, b)
			b = nb
		}
		c.SetReadDeadline(time.Now().Add(s.cfg.MessageTimeout))
		k, rerr := c.Read(b[len(b):need])
		b = b[:len(b)+k]
		if k == 0 && rerr != nil {
			// swtpm closes the connection without a reply when a request it waits for
			// in full stops short (its poll times out), and answers the others
			// BAD_PARAMETER on the same connection: do the same.
			pe := ctrl.Incomplete(b)
			if !pe.NoReply && !errors.Is(rerr, net.ErrClosed) {
				pe.Reason += " (" + rerr.Error() + ")"
				return ctrlMsg{perr: pe, raw: b}, fds, nil
			}
			clear(b)
			return ctrlMsg{}, fds, fmt.Errorf("%w (%v)", pe, rerr)
		}
	}
}

// readWithRights reads once from c, collecting SCM_RIGHTS fds on unix sockets.
func readWithRights(c net.Conn, buf []byte) (int, []int, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		n, err := c.Read(buf)
		return n, nil, err
	}
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	var fds []int
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for _, m := range msgs {
				if f, rerr := unix.ParseUnixRights(&m); rerr == nil {
					fds = append(fds, f...)
				}
			}
		}
	}
	return n, fds, err
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// Commands that need a running TPM, and the one that needs a stopped TPM; swtpm checks
// this before it looks at the body.
var (
	needsRunning = map[ctrl.Code]bool{
		ctrl.CmdGetEstablished: true, ctrl.CmdResetEstablished: true, ctrl.CmdHashStart: true,
		ctrl.CmdHashData: true, ctrl.CmdHashEnd: true, ctrl.CmdCancelTPMCmd: true,
		ctrl.CmdStoreVolatile: true, ctrl.CmdGetStateBlob: true,
	}
	needsStopped = map[ctrl.Code]bool{ctrl.CmdSetStateBlob: true}
)

// refuse answers a malformed request with swtpm's 4-byte reply, BAD_ORDINAL first when
// the TPM is in the wrong state for the command.
func (s *Server) refuse(pe *ctrl.ParseError) ctrl.ResultResponse {
	s.tpmMu.Lock()
	running := s.running
	s.tpmMu.Unlock()
	if (needsRunning[pe.Code] && !running) || (needsStopped[pe.Code] && running) {
		return ctrl.ResultResponse{Result: ctrl.ResBadOrdinal}
	}
	return ctrl.ResultResponse{Result: pe.Result}
}

// execCtrl executes one control request. after, if not nil, runs once the response was
// written (SHUTDOWN ends the server only after its reply).
func (s *Server) execCtrl(req ctrl.Request, fds []int) (resp ctrl.Response, after func()) {
	s.activity.Add(1)
	res := func(r ctrl.Result) ctrl.Response { return ctrl.ResultResponse{Result: r} }
	notRunning := res(ctrl.ResBadOrdinal)

	// CANCEL must not wait for the TPM lock: it targets the command holding it.
	if _, ok := req.(ctrl.CancelTPMCmd); ok {
		s.tpmMu.Lock()
		running := s.running
		s.tpmMu.Unlock()
		if !running {
			return notRunning, nil
		}
		return res(resultOf(s.cfg.Engine.Cancel())), nil
	}

	// GET_CAPABILITY needs no TPM: answered even while the TPM starts at launch.
	if _, ok := req.(ctrl.GetCapability); ok {
		return ctrl.CapabilityResponse{Caps: ctrl.CapsTPM2Socket}, nil
	}

	s.lockTPM()
	defer s.unlockTPM()
	s.log.Debug("control request", "cmd", req.Code())
	if needsRunning[req.Code()] && !s.running {
		return notRunning, nil
	}
	if needsStopped[req.Code()] && s.running {
		return notRunning, nil
	}

	switch r := req.(type) {
	case ctrl.Init:
		s.stopTPMLocked("INIT")
		if err := s.startTPMLocked(r.Flags); err != nil {
			s.log.Error("INIT failed; the TPM stays stopped", "err", err)
			return res(resultOf(err)), nil
		}
		return res(ctrl.ResSuccess), nil

	case ctrl.Stop:
		s.stopTPMLocked("STOP")
		return res(ctrl.ResSuccess), nil

	case ctrl.Shutdown:
		s.stopTPMLocked("SHUTDOWN")
		return res(ctrl.ResSuccess), func() { s.requestStop("SHUTDOWN on the control channel") }

	case ctrl.GetEstablished:
		bit, err := s.cfg.Engine.Established()
		return ctrl.EstablishedResponse{Result: resultOf(err), Bit: bit}, nil

	case ctrl.ResetEstablished:
		if r.Loc > 4 {
			return res(ctrl.ResBadLocality), nil
		}
		return res(resultOf(s.cfg.Engine.ResetEstablished(r.Loc))), nil

	case ctrl.SetLocality:
		if !s.localityOK(r.Loc) {
			return res(ctrl.ResBadLocality), nil
		}
		s.setLocalityLocked(r.Loc)
		return res(ctrl.ResSuccess), nil

	case ctrl.HashStart:
		return res(resultOf(s.cfg.Engine.HashStart())), nil
	case ctrl.HashData:
		return res(resultOf(s.cfg.Engine.HashData(r.Data))), nil
	case ctrl.HashEnd:
		return res(resultOf(s.cfg.Engine.HashEnd())), nil

	case ctrl.StoreVolatile:
		blob, err := s.cfg.Engine.VolatileAllStore()
		if err == nil {
			err = s.cfg.Store.Store(libtpms.Volatile.Name(), blob)
			clear(blob)
		}
		if err != nil {
			s.log.Error("STORE_VOLATILE failed", "err", err)
		}
		return res(resultOf(err)), nil

	case ctrl.GetStateBlob:
		return s.getStateBlobLocked(r), nil

	case ctrl.SetStateBlob:
		return res(s.setStateBlobLocked(r)), nil

	case ctrl.GetConfig:
		var flags uint32
		if s.cfg.StateKey != nil {
			flags |= ctrl.ConfigFileKey
		}
		if s.cfg.MigrationKey != nil {
			flags |= ctrl.ConfigMigrationKey
		}
		return ctrl.ConfigResponse{Flags: flags}, nil

	case ctrl.SetDataFD:
		return s.setDataFDLocked(fds)

	case ctrl.SetBufferSize:
		if r.Size > 0 && s.running {
			return notRunning, nil
		}
		size, lo, hi, err := s.cfg.Engine.SetBufferSize(r.Size)
		if err != nil {
			return res(resultOf(err)), nil
		}
		return ctrl.BufferSizeResponse{Size: size, Min: lo, Max: hi}, nil

	case ctrl.GetInfo:
		info, err := s.cfg.Engine.Info(r.Flags)
		if err != nil {
			return res(ctrl.ResSize), nil
		}
		if int64(r.Offset) >= int64(len(info)) {
			return res(ctrl.ResBadParameter), nil
		}
		full := append([]byte(info), 0) // the NUL is counted, as swtpm does
		chunk := full[r.Offset:]
		if len(chunk) > ctrl.MaxInfoChunk {
			chunk = chunk[:ctrl.MaxInfoChunk]
		}
		return ctrl.InfoResponse{TotLength: uint32(len(full)), Data: chunk}, nil

	case ctrl.LockStorage:
		if l, ok := s.cfg.Store.(StorageLocker); ok {
			if err := l.LockStorage(s.ctx, int(min(r.Retries, 1<<20))); err != nil {
				s.log.Error("LOCK_STORAGE failed", "err", err)
				return res(ctrl.ResFail), nil
			}
			s.lockReleased = false
		}
		return res(ctrl.ResSuccess), nil
	}
	return res(ctrl.ResBadOrdinal), nil
}

func (s *Server) localityOK(loc uint8) bool {
	return loc <= 4 && !(loc == 4 && s.cfg.RejectLocality4)
}

// setLocalityLocked sets the locality of the following commands. The engine keeps it
// (across INIT, as swtpm does); the data loop of an engine with one changes it too.
func (s *Server) setLocalityLocked(loc uint8) {
	s.cfg.Engine.SetLocality(loc)
}

// getStateBlobLocked answers GET_STATEBLOB on a running TPM: the current state in
// swtpm's migration envelope, from the requested offset, with totlength == length.
func (s *Server) getStateBlobLocked(r ctrl.GetStateBlob) ctrl.Response {
	if !r.Type.Valid() {
		// swtpm answers an unknown blob type as an absent blob (checked against 0.7.1).
		return ctrl.StateBlobResponse{Result: ctrl.ResRetry}
	}
	typ := libtpms.StateType(r.Type)
	raw, err := s.cfg.Engine.GetState(typ)
	if typ == libtpms.SaveState && s.cfg.ReleaseLockOutgoing {
		if l, ok := s.cfg.Store.(StorageLocker); ok {
			if lerr := l.ReleaseLock(); lerr != nil {
				s.log.Error("GET_STATEBLOB: releasing the state lock for the destination failed", "err", lerr)
			} else {
				s.lockReleased = true
				s.log.Info("state lock released for the migration destination (--migration release-lock-outgoing)")
			}
		}
	}
	if typ == libtpms.Volatile {
		// swtpm stores the volatile state, hands it out and deletes the file: a later
		// start must not resume from a state that has moved elsewhere.
		if derr := s.cfg.Store.Delete(typ.Name()); derr != nil && !errors.Is(derr, fs.ErrNotExist) {
			s.log.Warn("GET_STATEBLOB: could not delete the stored volatile state", "err", derr)
		}
	}
	if err != nil {
		if errors.Is(err, libtpms.ErrNoState) || errors.Is(err, fs.ErrNotExist) {
			return ctrl.StateBlobResponse{Result: ctrl.ResRetry}
		}
		s.log.Error("GET_STATEBLOB failed", "blob", typ, "err", err)
		return ctrl.StateBlobResponse{Result: resultOf(err)}
	}
	blob, flags, err := envelope.ForMigrationWithStateKey(raw, s.cfg.MigrationKey, s.cfg.StateKey, r.Flags&ctrl.StateFlagDecrypted != 0)
	clear(raw)
	if err != nil {
		s.log.Error("GET_STATEBLOB: wrapping the blob failed", "blob", typ, "err", err)
		return ctrl.StateBlobResponse{Result: ctrl.Result(envelope.ResultCode(err))}
	}
	if int64(r.Offset) >= int64(len(blob)) {
		return ctrl.StateBlobResponse{Flags: flags}
	}
	return ctrl.StateBlobResponse{Flags: flags, Data: blob[r.Offset:]}
}

// setStateBlobLocked takes a blob for a stopped TPM: unwrapped now (so a bad key or a
// corrupt blob is refused at once, as swtpm does), handed to libtpms, used at the next
// INIT. libtpms' MainInit stores a permanent blob set this way through the state store
// (swtpm/internal/libtpms TestStateRoundTrip), so a restarted destination finds it.
func (s *Server) setStateBlobLocked(r ctrl.SetStateBlob) ctrl.Result {
	if !r.Type.Valid() {
		return ctrl.ResBadParameter
	}
	typ := libtpms.StateType(r.Type)
	plain, err := envelope.FromMigration(r.Data, r.Flags, s.cfg.MigrationKey, s.cfg.StateKey)
	if err != nil {
		s.log.Error("SET_STATEBLOB refused", "blob", typ, "err", err)
		return ctrl.Result(envelope.ResultCode(err))
	}
	err = s.cfg.Engine.SetState(typ, plain)
	clear(plain)
	if err != nil {
		s.log.Error("SET_STATEBLOB: the TPM refused the blob", "blob", typ, "err", err)
		return resultOf(err)
	}
	return ctrl.ResSuccess
}

// setDataFDLocked adopts the data connection QEMU passes with SET_DATAFD.
func (s *Server) setDataFDLocked(fds []int) (ctrl.Response, func()) {
	res := func(r ctrl.Result) ctrl.Response { return ctrl.ResultResponse{Result: r} }
	if s.cfg.DataListener != nil || s.cfg.DataConn != nil || s.dataFD != nil {
		return res(ctrl.ResIOError), nil
	}
	if len(fds) == 0 {
		return res(ctrl.ResBadParameter), nil
	}
	fd := fds[0]
	fds[0] = -1 // taken: the caller closes the others
	if s.cs != nil {
		// Served by the engine's data loop, on the fd as it came.
		if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
			unix.Close(fd)
			s.log.Error("SET_DATAFD: the fd is not a stream socket", "err", err)
			return res(ctrl.ResBadParameter), nil
		}
		fc := newFDConn(fd)
		if !s.track(fc) {
			fc.release()
			return res(ctrl.ResIOError), nil
		}
		s.dataFD = fc
		return res(ctrl.ResSuccess), func() {
			s.goServe(func() { s.serveDataFD(fc, "SET_DATAFD", false, false) })
		}
	}
	f := os.NewFile(uintptr(fd), "datafd")
	conn, err := net.FileConn(f)
	f.Close() // FileConn dup'ed it
	if err != nil {
		s.log.Error("SET_DATAFD: the fd is not a socket", "err", err)
		return res(ctrl.ResBadParameter), nil
	}
	if !s.track(conn) {
		return res(ctrl.ResIOError), nil
	}
	s.dataFD = conn
	return res(ctrl.ResSuccess), func() {
		s.goServe(func() { s.serveDataConn(conn, "SET_DATAFD") })
	}
}
