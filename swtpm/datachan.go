package swtpm

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/data"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
)

// connServer is implemented by an engine that serves data connections itself
// (*libtpms.TPM: a C loop that reads, executes and answers each command without
// entering Go). Lock and Unlock exclude that loop's commands; LastCommand reports the
// last command wherever it came from.
type connServer interface {
	Lock()
	Unlock()
	ServeConn(fd int, o libtpms.ConnOptions) libtpms.ConnEnd
	LastCommand() uint32
}

// acceptData serves the data clients of DataListener one at a time.
func (s *Server) acceptData(l net.Listener) {
	s.accept(l, "data", func(c net.Conn) { s.serveDataConn(c, "data client") })
}

// serveDataConn answers TPM commands on one data connection until it closes, breaks,
// or (Config.Disconnect, --server connections only) after the first response. what
// names the connection's origin.
func (s *Server) serveDataConn(c net.Conn, what string) {
	isDataConn := c == s.cfg.DataConn
	if isDataConn {
		if !s.track(c) {
			s.dataLost(c, what, true)
			return
		}
	}
	if s.cs != nil {
		// Hand the socket to the engine's data loop: a duplicate of its fd, taken out
		// of the Go netpoller by closing c.
		fc, err := adopt(c)
		s.untrack(c)
		if err != nil {
			s.log.Error("data channel: cannot take the connection's socket", "conn", what, "err", err)
			s.dataLost(c, what, isDataConn)
			return
		}
		if !s.track(fc) {
			fc.release()
			s.dataLost(fc, what, isDataConn)
			return
		}
		s.serveDataFD(fc, what, s.cfg.Disconnect, isDataConn)
		return
	}
	disconnect := s.cfg.Disconnect && c != s.dataFDConn()
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
	s.dataLost(c, what, isDataConn)
}

// serveDataFD serves one data connection with the engine's data loop, which behaves
// as serveDataConn's Go loop does (package data's framing, the same replies and
// timeouts), and logs how it ended the same way.
func (s *Server) serveDataFD(fc *fdConn, what string, disconnect, isDataConn bool) {
	// The data loop takes only the engine's lock, per command: a connection that
	// came while the TPM starts at launch waits for the start, as the Go loop does on
	// tpmMu.
	select {
	case <-s.launched:
	case <-s.stop:
	}
	end := s.cs.ServeConn(fc.fd, libtpms.ConnOptions{
		MaxCommand:       s.maxCommand,
		MessageTimeout:   s.cfg.MessageTimeout,
		WriteTimeout:     s.cfg.WriteTimeout,
		RejectLocality4:  s.cfg.RejectLocality4,
		AllowSetLocality: s.cfg.AllowSetLocality,
		Disconnect:       disconnect,
		OnCommandError: func(err error) {
			s.log.Error("TPM command failed", "err", err)
		},
	})
	shut := fc.isShut() || s.stopping()
	switch end.Reason {
	case libtpms.EndEOF, libtpms.EndDisconnect:
	case libtpms.EndSize:
		se := &data.SizeError{Size: end.Size, Max: s.maxCommand, Prefixed: end.Prefixed}
		s.log.Warn("data channel: command refused, closing the connection", "conn", what, "err", se)
	case libtpms.EndWrite:
		if !shut {
			s.log.Warn("data channel: response not sent, closing the connection", "conn", what, "err", end.Err)
		}
	case libtpms.EndTruncated, libtpms.EndStalled:
		if !shut {
			why := "stream ended"
			if end.Reason == libtpms.EndStalled {
				why = fmt.Sprintf("nothing for %v", s.cfg.MessageTimeout)
			} else if end.Err != nil {
				why = end.Err.Error()
			}
			s.log.Warn("data channel: connection lost", "conn", what,
				"err", fmt.Errorf("%w after %d bytes: %s", data.ErrTruncated, end.Pending, why))
		}
	default:
		if !shut {
			s.log.Warn("data channel: connection lost", "conn", what, "reason", int(end.Reason), "err", end.Err)
		}
	}
	s.dataLost(fc, what, isDataConn)
	fc.release()
}

// dataLost closes a data connection and applies --terminate. isDataConn marks
// Config.DataConn (or the fdConn made of it).
func (s *Server) dataLost(c io.Closer, what string, isDataConn bool) {
	s.untrack(c)
	s.tpmMu.Lock()
	if s.dataFD == c {
		s.dataFD = nil // a new SET_DATAFD is accepted now
	}
	if isDataConn {
		s.dataConnOpen = false
	}
	s.tpmMu.Unlock()
	if s.cfg.Terminate && !s.stopping() {
		s.requestStop(what + " closed (--terminate)")
	}
	if s.ctrlGone.Load() && !s.dataReachable() {
		s.requestStop(what + " closed, and there is no control channel (clientfd gone, or no --ctrl): nothing can reach the TPM")
	}
}

// dataFDConn returns the connection that came by SET_DATAFD, if any.
func (s *Server) dataFDConn() io.Closer {
	s.tpmMu.Lock()
	defer s.tpmMu.Unlock()
	return s.dataFD
}

// fdConn is a data connection served by the engine's data loop: a socket fd outside
// the Go netpoller. Close shuts the socket down, which ends the loop; the fd itself is
// closed by release, once the loop returned, so it cannot be reused under the loop.
type fdConn struct {
	fd   int
	mu   sync.Mutex
	shut bool
	gone bool
}

func newFDConn(fd int) *fdConn { return &fdConn{fd: fd} }

// adopt takes the socket of c for the data loop: a close-on-exec duplicate of its fd;
// c itself is closed, which removes the socket from the Go netpoller.
func adopt(c net.Conn) (*fdConn, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("a %T is not a socket", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	nfd := -1
	var derr error
	if err := raw.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dup the socket: %w", derr)
	}
	c.Close()
	return newFDConn(nfd), nil
}

// Close shuts the socket down: the data loop sees the end of the stream.
func (c *fdConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.gone && !c.shut {
		c.shut = true
		unix.Shutdown(c.fd, unix.SHUT_RDWR)
	}
	return nil
}

func (c *fdConn) isShut() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.shut
}

// release closes the fd; the data loop must have returned.
func (c *fdConn) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.gone {
		c.gone = true
		unix.Close(c.fd)
	}
}

// execData runs one TPM command from the data channel and returns the response to send.
func (s *Server) execData(cmd data.Command) []byte {
	s.activity.Add(1)
	s.lockTPM()
	defer s.unlockTPM()
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
