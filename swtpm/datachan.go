package swtpm

import (
	"errors"
	"io"
	"net"

	"github.com/nkp-dev/nkp/swtpm/data"
)

// acceptData serves the data clients of DataListener one at a time.
func (s *Server) acceptData(l net.Listener) {
	s.accept(l, "data", func(c net.Conn) { s.serveDataConn(c, "data client") })
}

// serveDataConn answers TPM commands on one data connection until it closes, breaks,
// or (Config.Disconnect, --server connections only) after the first response. what
// names the connection's origin.
func (s *Server) serveDataConn(c net.Conn, what string) {
	disconnect := s.cfg.Disconnect && c != s.dataFDConn()
	if c == s.cfg.DataConn {
		if !s.track(c) {
			s.dataLost(c, what)
			return
		}
	}
	rd := s.newDataReader(c)
	for {
		cmd, err := rd.Next()
		if err != nil {
			var se *data.SizeError
			switch {
			case errors.As(err, &se):
				s.log.Warn("data channel: command refused, closing the connection", "conn", what, "err", se)
				if werr := s.writeAll(c, se.Response()); werr != nil {
					s.log.Debug("data channel: error response not sent", "err", werr)
				}
			case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), s.stopping():
			default:
				s.log.Warn("data channel: connection lost", "conn", what, "err", err)
			}
			break
		}
		resp := s.execData(cmd)
		reply := cmd.Reply(resp)
		werr := s.writeAll(c, reply)
		clear(reply) // responses carry unsealed data and NV contents
		clear(resp)
		if err := werr; err != nil {
			s.log.Warn("data channel: response not sent, closing the connection", "conn", what, "err", err)
			break
		}
		if disconnect {
			break
		}
	}
	s.dataLost(c, what)
}

// dataLost closes a data connection and applies --terminate.
func (s *Server) dataLost(c net.Conn, what string) {
	s.untrack(c)
	s.tpmMu.Lock()
	if s.dataFD == c {
		s.dataFD = nil // a new SET_DATAFD is accepted now
	}
	if c == s.cfg.DataConn {
		s.dataConnOpen = false
	}
	s.tpmMu.Unlock()
	if s.cfg.Terminate && !s.stopping() {
		s.requestStop(what + " closed (--terminate)")
	}
	if s.ctrlGone.Load() && !s.dataReachable() {
		s.requestStop(what + " closed, and the control connection (clientfd) is gone: nothing can reach the TPM")
	}
}

// dataFDConn returns the connection that came by SET_DATAFD, if any.
func (s *Server) dataFDConn() net.Conn {
	s.tpmMu.Lock()
	defer s.tpmMu.Unlock()
	return s.dataFD
}

// execData runs one TPM command from the data channel and returns the response to send.
func (s *Server) execData(cmd data.Command) []byte {
	s.tpmMu.Lock()
	defer s.tpmMu.Unlock()
	if cmd.Prefixed {
		if !s.localityOK(cmd.Locality) {
			return data.ErrorResponse(data.RCLocality)
		}
		s.setLocalityLocked(cmd.Locality)
	}
	if !s.running {
		return data.NotRunningResponse()
	}
	if cmd.Code() == data.CCSetLocality {
		return s.vendorSetLocalityLocked(cmd.Bytes)
	}
	return s.processLocked(cmd.Bytes)
}

// vendorSetLocalityLocked serves swtpm's TPM2_SetLocality vendor command (0x20001000):
// `header, u8 locality`. Without --locality allow-set-locality it gets the fatal-error
// response, as from swtpm.
func (s *Server) vendorSetLocalityLocked(cmd []byte) []byte {
	if !s.cfg.AllowSetLocality {
		return data.NotRunningResponse()
	}
	if len(cmd) < data.HeaderSize+1 {
		return data.ErrorResponse(data.RCInsufficient)
	}
	loc := cmd[data.HeaderSize]
	if !s.localityOK(loc) {
		return data.ErrorResponse(data.RCLocality)
	}
	s.setLocalityLocked(loc)
	return data.ErrorResponse(data.RCSuccess)
}
