// Package data frames swtpm's data channel: raw TPM 2.0 commands in, raw responses out,
// optionally wrapped in the TCG/mssim TPM_SEND_COMMAND prefix (spec §2).
//
// Unlike swtpm, which treats whatever one read() returned as the command, a Reader
// frames every command by the size field of its header, so a command split across
// writes or two commands in one write are both handled. A command larger than the
// limit is refused with a TPM error response and the connection is closed (see
// SizeError). The package is pure apart from reading an io.Reader; package swtpm uses it.
package data

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

var be = binary.BigEndian

// Wire constants of TPM 2.0 commands and responses.
const (
	HeaderSize    = 10     // tag u16, size u32, command code / response code u32
	TagNoSessions = 0x8001 // TPM_ST_NO_SESSIONS
	TagSessions   = 0x8002 // TPM_ST_SESSIONS

	// SendCommand is the TCG TPM_SEND_COMMAND code that opens the prefix
	// `u32 8, u8 locality, u32 size` in front of a command.
	SendCommand = 8
	// PrefixSize is the size of the TPM_SEND_COMMAND prefix.
	PrefixSize = 9

	RCSuccess      = 0x000
	RCInitialize   = 0x100 // TPM not started (no TPM2_Startup yet)
	RCFailure      = 0x101 // the reply while the TPM is not running
	RCInsufficient = 0x09a // command shorter than its header
	RCCommandSize  = 0x142 // command size does not match, or exceeds the buffer
	RCLocality     = 0x907 // command refused at this locality

	// CCShutdown and CCStartup are the TPM2 command codes the server itself sends.
	CCStartup  = 0x144
	CCShutdown = 0x145
	// CCSetLocality is swtpm's vendor ordinal that sets the locality in-band
	// (honoured only with --locality allow-set-locality).
	CCSetLocality = 0x20001000
)

// Command is one TPM command read from the data channel.
type Command struct {
	// Bytes is the TPM command, header included. Its length is the header's size field
	// (or, after the prefix, the prefix's size field).
	// It aliases the Reader's buffer and is valid until the next call to Next.
	Bytes []byte
	// Prefixed is set when the command came with the TPM_SEND_COMMAND prefix; the reply
	// must then be framed with Reply.
	Prefixed bool
	// Locality is the prefix's locality byte (Prefixed only).
	Locality uint8
}

// Code returns the command code (TPM_CC) of the command.
func (c *Command) Code() uint32 { return be.Uint32(c.Bytes[6:]) }

// Reply frames resp for this command: unchanged for a plain command, and as
// `u32 size, resp, u32 0` after the TPM_SEND_COMMAND prefix. The result is written
// with one Write.
func (c *Command) Reply(resp []byte) []byte {
	if !c.Prefixed {
		return resp
	}
	b := make([]byte, 4+len(resp)+4)
	be.PutUint32(b, uint32(len(resp)))
	copy(b[4:], resp)
	return b
}

// ErrorResponse returns the 10-byte TPM 2.0 response `80 01 0000000a rc`.
func ErrorResponse(rc uint32) []byte {
	b := make([]byte, HeaderSize)
	be.PutUint16(b, TagNoSessions)
	be.PutUint32(b[2:], HeaderSize)
	be.PutUint32(b[6:], rc)
	return b
}

// NotRunningResponse is the reply swtpm sends without asking the TPM while it is not
// running (before INIT, after STOP). QEMU's version probe depends on it.
func NotRunningResponse() []byte { return ErrorResponse(RCFailure) }

// ResponseCode returns the response code of a TPM response, or RCFailure if resp is
// shorter than a header.
func ResponseCode(resp []byte) uint32 {
	if len(resp) < HeaderSize {
		return RCFailure
	}
	return be.Uint32(resp[6:])
}

// SizeError is a command whose declared size the server refuses: smaller than a header,
// or larger than the buffer. The server replies with Response() and closes the
// connection: the size field is the only framing the stream has, and it is the field
// that is wrong, so skipping "the rest of the command" would trust garbage (up to 4 GiB
// of it). QEMU and TSS never send more than the buffer size they negotiated, so only a
// broken or hostile peer sees this.
type SizeError struct {
	Size     uint32 // the declared size
	Max      int    // the limit
	Prefixed bool   // the command came with the TPM_SEND_COMMAND prefix
}

// Error implements error.
func (e *SizeError) Error() string {
	if e.Size < HeaderSize {
		return fmt.Sprintf("TPM command: declared size %d is smaller than the %d-byte header", e.Size, HeaderSize)
	}
	return fmt.Sprintf("TPM command: declared size %d exceeds the buffer of %d bytes", e.Size, e.Max)
}

// Response is the TPM error response to send before closing: TPM_RC_COMMAND_SIZE, framed
// like the command.
func (e *SizeError) Response() []byte {
	c := Command{Prefixed: e.Prefixed}
	return c.Reply(ErrorResponse(RCCommandSize))
}

// ErrTruncated is returned when the stream ends or stalls inside a command.
var ErrTruncated = errors.New("TPM command truncated")

// Frame finds the first command in b. It returns the command and the number of bytes it
// took (prefix included); or need > len(b), the number of bytes needed to go on; or a
// *SizeError. max is the largest command accepted, without the prefix.
func Frame(b []byte, max int) (cmd Command, n int, need int, err error) {
	off := 0
	var size uint32
	if len(b) >= 4 && be.Uint16(b) != TagNoSessions && be.Uint16(b) != TagSessions && be.Uint32(b) == SendCommand {
		// TPM_SEND_COMMAND prefix: frame by its size (the TSS does the same) and let the
		// TPM judge the command inside.
		if len(b) < PrefixSize {
			return Command{}, 0, PrefixSize, nil
		}
		cmd.Prefixed, cmd.Locality, off = true, b[4], PrefixSize
		size = be.Uint32(b[5:])
	} else {
		if len(b) < 6 {
			return Command{}, 0, 6, nil
		}
		size = be.Uint32(b[2:])
	}
	if size < HeaderSize || uint64(size) > uint64(max) {
		return Command{}, 0, 0, &SizeError{Size: size, Max: max, Prefixed: cmd.Prefixed}
	}
	end := off + int(size)
	if len(b) < end {
		return Command{}, 0, end, nil
	}
	cmd.Bytes = b[off:end]
	return cmd, end, 0, nil
}

// Reader reads framed commands from a stream.
type Reader struct {
	r       io.Reader
	max     int
	timeout time.Duration
	buf     []byte
	start   int // first unconsumed byte
	end     int // end of valid data
	last    int // start of the command returned last, wiped by the next call
}

// deadliner is implemented by net.Conn and *os.File.
type deadliner interface {
	SetReadDeadline(time.Time) error
}

// NewReader returns a Reader that accepts commands of up to max bytes. Once the first
// byte of a command has arrived, the rest must arrive within timeout (when r has
// SetReadDeadline, as net.Conn does); waiting for the first byte is not bounded.
func NewReader(r io.Reader, max int, timeout time.Duration) *Reader {
	return &Reader{r: r, max: max, timeout: timeout, buf: make([]byte, max+PrefixSize)}
}

// Next returns the next command. It returns io.EOF when the stream ends between
// commands, an error wrapping ErrTruncated when it ends or stalls inside one, and a
// *SizeError for a refused size.
func (r *Reader) Next() (Command, error) {
	clear(r.buf[r.last:r.start]) // the previous command (auth values, NV data) is done with
	r.last = r.start
	var deadlineSet bool
	defer func() {
		if deadlineSet {
			r.r.(deadliner).SetReadDeadline(time.Time{})
		}
	}()
	for {
		cmd, n, need, err := Frame(r.buf[r.start:r.end], r.max)
		if err != nil {
			return Command{}, err
		}
		if n > 0 {
			r.last = r.start
			r.start += n
			return cmd, nil
		}
		if r.start > 0 && r.start+need > len(r.buf) {
			copy(r.buf, r.buf[r.start:r.end])
			clear(r.buf[r.end-r.start : r.end])
			r.end -= r.start
			r.start, r.last = 0, 0
		}
		if r.end > r.start && !deadlineSet && r.timeout > 0 {
			if d, ok := r.r.(deadliner); ok {
				if err := d.SetReadDeadline(time.Now().Add(r.timeout)); err == nil {
					deadlineSet = true
				}
			}
		}
		k, err := r.r.Read(r.buf[r.end:])
		r.end += k
		if k > 0 {
			continue
		}
		if err == nil {
			continue
		}
		if r.end == r.start && errors.Is(err, io.EOF) {
			return Command{}, io.EOF
		}
		if r.end > r.start {
			return Command{}, fmt.Errorf("%w after %d bytes: %w", ErrTruncated, r.end-r.start, err)
		}
		return Command{}, err
	}
}

// Buffered reports how many bytes of later commands are already read.
func (r *Reader) Buffered() int { return r.end - r.start }
