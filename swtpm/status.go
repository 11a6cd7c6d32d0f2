package swtpm

import (
	"errors"
	"net"
	"time"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
)

// statusCodes are the control requests the status channel answers: they only read.
// GET_TPMESTABLISHED goes through the engine's lock and into the TPM, so its answer
// shows that the vTPM is serving, without touching what the guest sees.
var statusCodes = map[ctrl.Code]bool{ctrl.CmdGetCapability: true, ctrl.CmdGetEstablished: true}

// statusTimeout bounds one status client: its request and the answer.
const statusTimeout = 5 * time.Second

// serveStatus serves Config.StatusListener: one request per connection, clients one at
// a time. The channel never stops the server: an accept error ends only this loop.
func (s *Server) serveStatus(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			if !s.stopping() && !errors.Is(err, net.ErrClosed) {
				s.log.Warn("status channel: accept failed; it stops answering", "err", err)
			}
			return
		}
		if !s.track(c) {
			return
		}
		s.serveStatusConn(c)
	}
}

func (s *Server) serveStatusConn(c net.Conn) {
	defer s.untrack(c)
	c.SetDeadline(time.Now().Add(statusTimeout))
	buf := make([]byte, 64)
	msg, fds, err := s.readCtrlMsg(c, buf)
	closeFDs(fds)
	if err != nil {
		return
	}
	c.SetDeadline(time.Now().Add(statusTimeout))
	var resp ctrl.Response
	switch {
	case msg.perr != nil:
		resp = s.refuse(msg.perr)
	case !statusCodes[msg.req.Code()]:
		resp = ctrl.ResultResponse{Result: ctrl.ResBadOrdinal}
		s.log.Warn("status channel: request refused: it answers only GET_CAPABILITY and GET_TPMESTABLISHED", "cmd", msg.req.Code())
	default:
		resp, _ = s.execCtrl(msg.req, nil)
	}
	c.Write(resp.Marshal())
}
