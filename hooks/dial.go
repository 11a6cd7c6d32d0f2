package hooks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
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
		return nil, dialErr(path, err)
	}
	return c, nil
}

// dialErr is the error of a connect to path that failed with err.
func dialErr(path string, err error) error {
	if errors.Is(err, syscall.EAGAIN) || errors.Is(err, errTimeout) {
		return fmt.Errorf("connect %s: listener busy: %w", path, errTimeout)
	}
	return &os.PathError{Op: "connect", Path: path, Err: err}
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
		if err != nil && err != syscall.EINTR {
			return done, callErr("write", c.path, err)
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
		case err != syscall.EINTR:
			return 0, callErr("read", c.path, err)
		}
	}
}

// callErr is the error of a read or write (op) on the socket at path that failed with
// err: the socket's timeout (EAGAIN) is errTimeout.
func callErr(op, path string, err error) error {
	if err == syscall.EAGAIN {
		return errTimeout
	}
	return &os.PathError{Op: op, Path: path, Err: err}
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

// Exchange is how far cmd/nkp-hook's assembly entry got with a request before it handed
// over to the Go runtime (it answers an allow without a message itself): Run takes the
// outcome from it, as the same calls in Go would have returned it, and never sends the
// request again.
type Exchange struct {
	Start time.Time // when the entry began: the deadline counts from it
	Stage Stage
	// Errno is the failed call's error number (0 with StageRead: end of file); with
	// Sockopt, setting the socket's timeout failed (a timeout already passed is EAGAIN
	// without Sockopt, as a call's own timeout is).
	Errno   syscall.Errno
	Sockopt bool
	Fd      int    // the connected socket (StageWrite, StageRead, StageReply); Run closes it
	Reply   []byte // the reply's first bytes (StageRead, StageReply)
}

// Stage is where the entry stopped.
type Stage int

// Stages of an Exchange.
const (
	StageConnect Stage = 1 + iota // the connect failed: nothing was sent
	StageWrite                    // sending the request failed (hostd may have read part of it)
	StageRead                     // the request went out; the reply ended after Reply (Errno, or end of file)
	StageReply                    // the request went out; Reply is not hookproto.ReplyAllow: the rest is on Fd
)

// ask is the package's ask replayed from what the entry did.
func (x *Exchange) ask(ctx context.Context, socket string, req hookproto.Request, deadline time.Time) (hookproto.Reply, error) {
	if x.Stage == StageConnect {
		return hookproto.Reply{}, dialErr(socket, x.err())
	}
	r := &replay{x: x, got: x.Reply, c: &conn{fd: x.Fd, path: socket, deadline: deadline}}
	return exchange(ctx, r, req)
}

// err is the entry's failure as the Go call would have returned it.
func (x *Exchange) err() error {
	if x.Sockopt {
		return os.NewSyscallError("setsockopt", x.Errno)
	}
	if x.Errno == syscall.EAGAIN {
		return errTimeout
	}
	return x.Errno
}

func (x *Exchange) close() {
	if x.Stage != StageConnect && x.Fd > 2 {
		syscall.Close(x.Fd)
		x.Fd = -1
	}
}

// replay plays the entry's exchange back to exchange: the write was done (or failed),
// the reply's first bytes were read (and then it failed or ended, or it continues on
// the socket).
type replay struct {
	x   *Exchange
	got []byte
	c   *conn
}

func (r *replay) Write(p []byte) (int, error) {
	if r.x.Stage == StageWrite {
		err := r.x.err()
		if !r.x.Sockopt && err != errTimeout {
			err = callErr("write", r.c.path, r.x.Errno)
		}
		return 0, err
	}
	return len(p), nil
}

func (r *replay) Read(p []byte) (int, error) {
	if len(r.got) > 0 {
		n := copy(p, r.got)
		r.got = r.got[n:]
		return n, nil
	}
	switch {
	case r.x.Stage == StageReply:
		return r.c.Read(p)
	case r.x.Errno == 0:
		return 0, io.EOF
	case r.x.Sockopt || r.x.Errno == syscall.EAGAIN:
		return 0, r.x.err()
	}
	return 0, callErr("read", r.c.path, r.x.Errno)
}
