package hooks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
)

// conn is a blocking unix stream socket whose send and receive timeouts (SO_SNDTIMEO,
// SO_RCVTIMEO) are set to what is left until the deadline before every call: the hook
// neither initialises package net nor Go's netpoller (an epoll set, an event fd, and a
// reply awaited by a parked goroutine that another thread may pick up), and it starts
// no timer. On a host where 50 QEMUs start at once every wake-up of a thread is a wait
// for a CPU; with a blocking read the hook's one thread sleeps once, for the answer.
type conn struct {
	fd       int
	path     string
	deadline time.Time
}

// errTimeout is wrapped when the deadline passes during a call.
var errTimeout = os.ErrDeadlineExceeded

// dialUnix connects to the unix stream socket at path before deadline. A listener whose
// backlog is full makes connect wait (bounded by the send timeout) rather than fail.
func dialUnix(path string, deadline time.Time) (*conn, error) {
	if len(path) >= len(syscall.RawSockaddrUnix{}.Path) {
		return nil, fmt.Errorf("socket path %q is too long for a unix socket", path)
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	c := &conn{fd: fd, path: path, deadline: deadline}
	for {
		if err = c.setTimeout(syscall.SO_SNDTIMEO); err == nil {
			err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: path})
		}
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		syscall.Close(fd)
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, errTimeout) {
			return nil, fmt.Errorf("connect %s: listener busy: %w", path, errTimeout)
		}
		return nil, &os.PathError{Op: "connect", Path: path, Err: err}
	}
	return c, nil
}

// setTimeout sets the socket option opt (SO_SNDTIMEO or SO_RCVTIMEO) to the time left,
// or returns errTimeout if there is none.
func (c *conn) setTimeout(opt int) error {
	left := time.Until(c.deadline)
	if left <= 0 {
		return errTimeout
	}
	if left < time.Microsecond {
		left = time.Microsecond // a zero timeval would mean no timeout at all
	}
	tv := syscall.NsecToTimeval(left.Nanoseconds())
	return os.NewSyscallError("setsockopt", syscall.SetsockoptTimeval(c.fd, syscall.SOL_SOCKET, opt, &tv))
}

// Write writes all of p before the deadline.
func (c *conn) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		if err := c.setTimeout(syscall.SO_SNDTIMEO); err != nil {
			return done, err
		}
		n, err := syscall.Write(c.fd, p[done:])
		if n > 0 {
			done += n
		}
		switch {
		case err == nil || err == syscall.EINTR:
		case err == syscall.EAGAIN:
			return done, errTimeout
		default:
			return done, &os.PathError{Op: "write", Path: c.path, Err: err}
		}
	}
	return done, nil
}

// Read reads what is there, waiting until the deadline.
func (c *conn) Read(p []byte) (int, error) {
	for {
		if err := c.setTimeout(syscall.SO_RCVTIMEO); err != nil {
			return 0, err
		}
		n, err := syscall.Read(c.fd, p)
		switch {
		case err == nil && n == 0 && len(p) > 0:
			return 0, io.EOF
		case err == nil:
			return n, nil
		case err == syscall.EINTR:
		case err == syscall.EAGAIN:
			return 0, errTimeout
		default:
			return 0, &os.PathError{Op: "read", Path: c.path, Err: err}
		}
	}
}

// Close closes the socket.
func (c *conn) Close() error { return syscall.Close(c.fd) }

// closeOnCancel shuts c down when ctx is cancelled (a deadline is already in c), which
// ends a blocked call; the returned func stops that.
func (c *conn) closeOnCancel(ctx context.Context) func() bool {
	if ctx.Done() == nil {
		return func() bool { return true }
	}
	return context.AfterFunc(ctx, func() { syscall.Shutdown(c.fd, syscall.SHUT_RDWR) })
}
