package libtpms

import (
	"errors"
	"fmt"
	"io/fs"
	"time"
)

// StateType names one of libtpms' three state blobs. The numbering is that of
// the swtpm control protocol's PTM_BLOB_TYPE_* values, so a control-channel
// request's blob type converts directly.
type StateType uint32

// The state blobs.
const (
	Permanent StateType = 1 // "permall": seeds, hierarchy auth, NV indices, persistent objects
	Volatile  StateType = 2 // "volatilestate": PCRs, loaded objects and sessions, clock
	SaveState StateType = 3 // "savestate": always empty for TPM 2 (libtpms keeps orderly data in permall)
)

// Name returns the name libtpms uses for the blob in its NVRAM callbacks
// ("permall", "volatilestate", "savestate"), or "" for an unknown type.
func (s StateType) Name() string {
	switch s {
	case Permanent:
		return "permall"
	case Volatile:
		return "volatilestate"
	case SaveState:
		return "savestate"
	}
	return ""
}

func (s StateType) String() string {
	if n := s.Name(); n != "" {
		return n
	}
	return fmt.Sprintf("StateType(%d)", uint32(s))
}

// NVRAM is where libtpms' nvram callbacks land. Names: "permall",
// "volatilestate", "savestate". Load returns an error wrapping fs.ErrNotExist
// when there is nothing (the TPM then manufactures itself). The methods are
// called from inside TPM calls (MainInit, Process, SetState, GetState), on the
// calling goroutine, and must not call back into the TPM.
type NVRAM interface {
	Load(name string) ([]byte, error)
	Store(name string, data []byte) error
	Delete(name string) error
}

// Result is a libtpms result code (TPM 1.2 numbering, as on the swtpm control
// channel: 3 BAD_PARAMETER, 9 FAIL, 0x3d BAD_LOCALITY, 0x800 RETRY, ...).
// Errors returned by this package wrap a Result whenever libtpms itself
// refused, so a server can send the code on: errors.As(err, &res).
type Result uint32

// Result codes this package reports or that callers commonly map.
const (
	ResultSuccess      Result = 0
	ResultBadParameter Result = 0x03
	ResultFail         Result = 0x09
	ResultBadOrdinal   Result = 0x0a
	ResultSize         Result = 0x17
	ResultBadLocality  Result = 0x3d
	ResultInvalidPost  Result = 0x26 // TPM_INVALID_POSTINIT: state set while the TPM runs
	ResultRetry        Result = 0x800
)

func (r Result) Error() string {
	switch r {
	case ResultSuccess:
		return "success"
	case ResultBadParameter:
		return "TPM_BAD_PARAMETER (0x3)"
	case ResultFail:
		return "TPM_FAIL (0x9)"
	case ResultBadOrdinal:
		return "TPM_BAD_ORDINAL (0xa)"
	case ResultSize:
		return "TPM_SIZE (0x17)"
	case ResultInvalidPost:
		return "TPM_INVALID_POSTINIT (0x26)"
	case ResultBadLocality:
		return "TPM_BAD_LOCALITY (0x3d)"
	case ResultRetry:
		return "TPM_RETRY (0x800)"
	}
	return fmt.Sprintf("libtpms result 0x%x", uint32(r))
}

// Sentinel errors, checked with errors.Is.
var (
	// ErrInUse: libtpms keeps its TPM in global state, so a process holds
	// at most one open TPM. Close the other one first.
	ErrInUse = errors.New("libtpms: a TPM is already open in this process (libtpms has one global TPM); close it first")
	// ErrClosed: the TPM was closed.
	ErrClosed = errors.New("libtpms: TPM is closed")
	// ErrNotRunning: the call needs a TPM started with MainInit. It wraps
	// ResultBadOrdinal, what swtpm answers on the control channel then.
	ErrNotRunning = fmt.Errorf("libtpms: TPM is not running, call MainInit first (%w)", ResultBadOrdinal)
	// ErrRunning: the call needs a stopped TPM (before MainInit or after
	// Terminate). It wraps ResultBadOrdinal, as ErrNotRunning.
	ErrRunning = fmt.Errorf("libtpms: TPM is running, call Terminate first (%w)", ResultBadOrdinal)
	// ErrNoState: libtpms has no blob of the requested type (savestate of a
	// TPM 2 always). It wraps fs.ErrNotExist and ResultRetry (swtpm's answer).
	ErrNoState = fmt.Errorf("libtpms: no state blob of this type (%w): %w", ResultRetry, fs.ErrNotExist)
	// ErrNoCgo: the package was built without cgo and cannot reach libtpms.
	ErrNoCgo = errors.New("libtpms: built without cgo; rebuild with CGO_ENABLED=1 and libtpms-dev installed")
)

// MaxBlobSize bounds a state blob handed to SetState or returned by Load. It
// matches swtpm's 512 KiB cap on SET_STATEBLOB; real blobs are below 64 KiB.
const MaxBlobSize = 512 << 10

// ConnOptions configures TPM.ServeConn, one data connection served by the engine's
// own loop.
type ConnOptions struct {
	// MaxCommand is the largest command accepted, without the TPM_SEND_COMMAND
	// prefix (the server's libtpms buffer size). Larger or smaller-than-a-header
	// sizes get TPM_RC_COMMAND_SIZE and end the connection (EndSize).
	MaxCommand int
	// MessageTimeout bounds the wait for the rest of a command once its first byte
	// came (EndStalled); 0 waits forever. Waiting for a first byte is unbounded.
	MessageTimeout time.Duration
	// WriteTimeout bounds writing one response (EndWrite with ETIMEDOUT); 0 waits forever.
	WriteTimeout time.Duration
	// RejectLocality4 refuses locality 4 in the TPM_SEND_COMMAND prefix and in
	// TPM2_SetLocality with TPM_RC_LOCALITY.
	RejectLocality4 bool
	// AllowSetLocality serves swtpm's TPM2_SetLocality vendor command
	// (0x20001000); without it the command gets TPM_RC_FAILURE, as from swtpm.
	AllowSetLocality bool
	// Disconnect ends the connection after the first response (EndDisconnect).
	Disconnect bool
	// OnCommandError, if set, is called when the engine failed a command (a state
	// Store that failed, which puts libtpms in failure mode). The command then got
	// TPM_RC_FAILURE and is not acknowledged. It runs with the TPM locked and must
	// not call the TPM.
	OnCommandError func(error)
}

// EndReason says why ServeConn returned.
type EndReason int

// The reasons.
const (
	EndEOF        EndReason = iota + 1 // the peer closed (or the socket was shut down) between commands
	EndSize                            // a refused command size; TPM_RC_COMMAND_SIZE was sent
	EndTruncated                       // the stream ended inside a command
	EndStalled                         // the rest of a command did not come within MessageTimeout
	EndRead                            // reading failed (Err)
	EndWrite                           // writing a response failed (Err)
	EndDisconnect                      // ConnOptions.Disconnect: one response was sent
	EndNoMemory                        // the loop could not allocate its buffers
)

// ConnEnd is how a connection served by ServeConn ended.
type ConnEnd struct {
	Reason   EndReason
	Err      error  // the system call's error, for EndRead, EndWrite and some EndTruncated
	Size     uint32 // EndSize: the declared size
	Prefixed bool   // EndSize: the command came with the TPM_SEND_COMMAND prefix
	Pending  int    // EndTruncated, EndStalled: bytes of the unfinished command
	Commands uint64 // commands answered
}

// LinkInfo is what Linked reports: the versions of libtpms and OpenSSL the process
// runs, and whether they were linked into the binary (Static) or are Debian's shared
// libraries. Empty without cgo.
type LinkInfo struct {
	Static  bool
	Libtpms string // e.g. "0.9.2"
	OpenSSL string // OpenSSL_version(OPENSSL_VERSION), e.g. "OpenSSL 3.0.19 27 Jan 2026"
}
