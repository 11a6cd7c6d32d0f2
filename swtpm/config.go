package swtpm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
)

// Engine is the TPM 2.0 the server drives: the methods of *libtpms.TPM that the server
// calls, and nothing else. Tests use a fake.
type Engine interface {
	SetState(typ libtpms.StateType, blob []byte) error
	GetState(typ libtpms.StateType) ([]byte, error)
	MainInit() error
	Terminate()
	Process(cmd []byte) ([]byte, error)
	SetLocality(loc uint8)
	VolatileAllStore() ([]byte, error)
	SetBufferSize(want uint32) (actual, min, max uint32, err error)
	Info(flags uint64) (string, error)
	HashStart() error
	HashData(p []byte) error
	HashEnd() error
	Established() (bool, error)
	ResetEstablished(loc uint8) error
	Cancel() error
}

// Store is the state store as the server uses it (*state.Dir implements it): the
// server writes the volatile state on STORE_VOLATILE and deletes it where swtpm does;
// libtpms itself writes through the same store from inside Engine calls (the permanent
// state after NV changes, and one set by SET_STATEBLOB when MainInit starts from it).
type Store interface {
	Store(name string, data []byte) error
	Delete(name string) error
}

// StorageLocker is implemented by stores whose lock can be given up for an outgoing
// shared-storage migration and taken again (*state.Dir does). LOCK_STORAGE calls
// LockStorage; with Config.ReleaseLockOutgoing, GET_STATEBLOB of the savestate calls
// ReleaseLock, as swtpm does. Without it LOCK_STORAGE simply succeeds (the store holds
// its lock for its whole life).
type StorageLocker interface {
	LockStorage(ctx context.Context, retries int) error
	ReleaseLock() error
}

// Startup is the TPM2_Startup the server sends itself (--flags startup-*).
type Startup string

// Startup types. StartupDeactivated exists only for TPM 1.2 and is refused.
const (
	StartupNone        Startup = ""
	StartupClear       Startup = "clear"
	StartupState       Startup = "state"
	StartupDeactivated Startup = "deactivated"
)

// Config configures a Server. Names follow swtpm's command-line options (spec §3); the
// CLI (package swtpm/cli) opens the sockets and the state and fills this in.
type Config struct {
	// Engine is the TPM (required). The server starts and stops it, but does not Close
	// it: the caller owns it and closes it after Serve returned.
	Engine Engine
	// Store is the state store libtpms writes through (required). Not closed by the server.
	Store Store
	// Log receives the server's log; nil discards it. Keys and TPM payloads are never logged.
	Log *slog.Logger

	// CtrlListener accepts control clients one at a time (--ctrl type=unixio,path= or
	// fd=, or type=tcp,port=). At most one of CtrlListener and CtrlConn is set; with
	// neither (swtpm without --ctrl) the TPM is served on the data channel only, which
	// must then be given, and only a TPM started at launch (NotNeedInit) answers.
	CtrlListener net.Listener
	// CtrlConn is an already connected control stream (--ctrl type=unixio,clientfd=).
	CtrlConn net.Conn
	// CtrlTerminate ends Serve when the control connection is lost (--ctrl ...,terminate).
	CtrlTerminate bool

	// StatusListener, if set, is nkp's status channel (not swtpm's): each client sends one
	// control request, answered only if it reads (GET_CAPABILITY, GET_TPMESTABLISHED),
	// beside the control client that holds CtrlListener. nkp-hostd asks there whether a
	// running VM's vTPM answers (swtpm/cli: NKP_SWTPM_STATUS_FD).
	StatusListener net.Listener

	// DataListener accepts data clients one at a time (--server type=unixio|tcp). At most
	// one of DataListener and DataConn is set; with neither, the data channel arrives by
	// SET_DATAFD (how QEMU connects).
	DataListener net.Listener
	// DataConn is an already connected data stream (--server type=tcp,fd=, -f).
	DataConn net.Conn
	// Disconnect closes the data connection after each response (--server ...,disconnect).
	Disconnect bool
	// Terminate ends Serve when the data connection goes away, including the one that
	// came by SET_DATAFD (-t/--terminate; libvirt passes it).
	Terminate bool

	// NotNeedInit starts the TPM in Serve, without waiting for CMD_INIT
	// (--flags not-need-init; implied by a Startup).
	NotNeedInit bool
	// Startup is the TPM2_Startup the server sends after starting the TPM in Serve
	// (--flags startup-clear|startup-state; startup-none is StartupNone).
	Startup Startup
	// DisableAutoShutdown turns off the TPM2_Shutdown the server sends before INIT,
	// STOP, SHUTDOWN and exit when the last command was not one (--flags disable-auto-shutdown).
	DisableAutoShutdown bool

	// RejectLocality4 refuses locality 4 on SET_LOCALITY and in the TPM_SEND_COMMAND
	// prefix (--locality reject-locality-4).
	RejectLocality4 bool
	// AllowSetLocality serves the TPM2_SetLocality vendor command 0x20001000 on the data
	// channel (--locality allow-set-locality).
	AllowSetLocality bool

	// StateKey is the key the state is encrypted with (--key), 16 or 32 bytes, or nil.
	// The server uses it only for the state-key layer of migration blobs and for
	// GET_CONFIG; the Store has its own copy. The server does not wipe it.
	StateKey []byte
	// MigrationKey encrypts GET_STATEBLOB blobs and decrypts SET_STATEBLOB blobs
	// (--migration-key), 16 or 32 bytes, or nil. The server does not wipe it.
	MigrationKey []byte

	// ReleaseLockOutgoing releases the store's lock when the savestate blob is read,
	// the last GET_STATEBLOB of an outgoing migration, so that a destination on shared
	// storage can take it (--migration release-lock-outgoing; needs a StorageLocker).
	ReleaseLockOutgoing bool

	// IdleTrim, when above zero, makes Serve drop the process' mappings of its
	// read-only file-backed segments once the TPM has been idle this long (no control
	// request, no data command); see "Idle trim" in the package doc. 0: never. The CLI
	// sets DefaultIdleTrim. It acts on the whole process: leave it 0 where the server
	// shares its process with other work (tests, embedding programs).
	IdleTrim time.Duration

	// Serving, if set, is called once by Serve when its channels take clients: after
	// their goroutines had a first turn (so that a control client already waiting has
	// its answer) and before the TPM starts at launch; Ready is closed after it
	// returned. The CLI logs its start there, off the path of that first answer.
	Serving func()

	// MessageTimeout bounds how long the rest of a message may take once its first byte
	// arrived, on both channels (swtpm: 500 ms on the control channel). Default 500 ms.
	MessageTimeout time.Duration
	// WriteTimeout bounds writing one response to a peer that does not read. Default 5 s.
	WriteTimeout time.Duration
}

// Defaults of Config's timeouts.
const (
	DefaultMessageTimeout = 500 * time.Millisecond
	DefaultWriteTimeout   = 5 * time.Second
)

// ErrConfig is wrapped by every error of Validate.
var ErrConfig = errors.New("invalid vTPM server configuration")

// Validate checks cfg and names the bad field (and the swtpm option it comes from).
func (cfg *Config) Validate() error {
	bad := func(field, why string) error { return fmt.Errorf("%w: %s: %s", ErrConfig, field, why) }
	switch {
	case cfg.Engine == nil:
		return bad("Engine", "no TPM engine given (open one with libtpms.Open)")
	case cfg.Store == nil:
		return bad("Store", "no state store given (open one with state.Open; --tpmstate)")
	case cfg.CtrlListener == nil && cfg.CtrlConn == nil && cfg.DataListener == nil && cfg.DataConn == nil:
		return bad("CtrlListener", "no channel given: a control channel (--ctrl type=unixio,path=... or clientfd=) or, for a data-only TPM, a data channel (--server)")
	case cfg.CtrlListener != nil && cfg.CtrlConn != nil:
		return bad("CtrlConn", "set CtrlListener or CtrlConn, not both (--ctrl takes one of path=, fd=, clientfd=, port=)")
	case cfg.DataListener != nil && cfg.DataConn != nil:
		return bad("DataConn", "set DataListener or DataConn, not both (--server takes one of path=, port=, fd=)")
	case cfg.Startup == StartupDeactivated:
		return bad("Startup", "startup-deactivated exists only for TPM 1.2; use startup-clear or startup-state")
	case cfg.Startup != StartupNone && cfg.Startup != StartupClear && cfg.Startup != StartupState:
		return bad("Startup", fmt.Sprintf("unknown startup type %q; want clear, state or none", cfg.Startup))
	case cfg.MessageTimeout < 0:
		return bad("MessageTimeout", "negative")
	case cfg.WriteTimeout < 0:
		return bad("WriteTimeout", "negative")
	}
	for _, k := range []struct {
		name string
		key  []byte
	}{{"StateKey", cfg.StateKey}, {"MigrationKey", cfg.MigrationKey}} {
		if k.key != nil && len(k.key) != 16 && len(k.key) != 32 {
			return bad(k.name, fmt.Sprintf("key of %d bytes, want 16 (aes-128-cbc) or 32 (aes-256-cbc)", len(k.key)))
		}
	}
	return nil
}
