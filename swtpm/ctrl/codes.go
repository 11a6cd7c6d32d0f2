// Package ctrl is the wire format of swtpm's control channel (the CMD_* protocol that
// QEMU's tpm-emulator backend, libvirt, swtpm_ioctl and tpm2-tss' swtpm TCTI speak):
// command codes, result codes, capability bits, one struct per request and response,
// and a parser that frames requests from a byte stream that carries no length prefix.
//
// The package is pure: it does no I/O. The server in package swtpm reads bytes, asks
// Parse whether a request is complete, executes it and writes the encoded response.
// Every integer on the wire is big-endian. The byte layouts follow
// specs/swtpm-protocol.md §1, verified against swtpm 0.7.1 and QEMU 7.2.
//
// Any package may import ctrl (tests and tools use it as a client too).
package ctrl

import "fmt"

// Code is a control channel command code (the first 4 bytes of every request).
type Code uint32

// Control channel command codes (swtpm's tpm_ioctl.h, socket form).
const (
	CmdGetCapability    Code = 0x01
	CmdInit             Code = 0x02
	CmdShutdown         Code = 0x03
	CmdGetEstablished   Code = 0x04
	CmdSetLocality      Code = 0x05
	CmdHashStart        Code = 0x06
	CmdHashData         Code = 0x07
	CmdHashEnd          Code = 0x08
	CmdCancelTPMCmd     Code = 0x09
	CmdStoreVolatile    Code = 0x0a
	CmdResetEstablished Code = 0x0b
	CmdGetStateBlob     Code = 0x0c
	CmdSetStateBlob     Code = 0x0d
	CmdStop             Code = 0x0e
	CmdGetConfig        Code = 0x0f
	CmdSetDataFD        Code = 0x10
	CmdSetBufferSize    Code = 0x11
	CmdGetInfo          Code = 0x12
	CmdLockStorage      Code = 0x13
)

var codeNames = map[Code]string{
	CmdGetCapability:    "GET_CAPABILITY",
	CmdInit:             "INIT",
	CmdShutdown:         "SHUTDOWN",
	CmdGetEstablished:   "GET_TPMESTABLISHED",
	CmdSetLocality:      "SET_LOCALITY",
	CmdHashStart:        "HASH_START",
	CmdHashData:         "HASH_DATA",
	CmdHashEnd:          "HASH_END",
	CmdCancelTPMCmd:     "CANCEL_TPM_CMD",
	CmdStoreVolatile:    "STORE_VOLATILE",
	CmdResetEstablished: "RESET_TPMESTABLISHED",
	CmdGetStateBlob:     "GET_STATEBLOB",
	CmdSetStateBlob:     "SET_STATEBLOB",
	CmdStop:             "STOP",
	CmdGetConfig:        "GET_CONFIG",
	CmdSetDataFD:        "SET_DATAFD",
	CmdSetBufferSize:    "SET_BUFFERSIZE",
	CmdGetInfo:          "GET_INFO",
	CmdLockStorage:      "LOCK_STORAGE",
}

// String returns swtpm's name of the command without the CMD_ prefix.
func (c Code) String() string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return fmt.Sprintf("CMD_0x%x", uint32(c))
}

// Known reports whether c is a command this package can parse.
func (c Code) Known() bool {
	_, ok := codeNames[c]
	return ok
}

// Result is the 4-byte result code that starts every response (TPM 1.2 numbering, as
// swtpm uses on this channel for both TPM versions).
type Result uint32

// Result codes returned on the control channel.
const (
	ResSuccess        Result = 0x00
	ResBadParameter   Result = 0x03  // body too short or malformed, data fd missing
	ResFail           Result = 0x09  // generic failure
	ResBadOrdinal     Result = 0x0a  // unknown command, or TPM in the wrong running state
	ResKeyNotFound    Result = 0x0d  // no key for an encrypted blob
	ResSize           Result = 0x17  // out of memory / size problem
	ResIOError        Result = 0x1f  // I/O error, or a data channel already exists
	ResDecryptError   Result = 0x21  // a blob did not decrypt or authenticate
	ResBadKeyProperty Result = 0x28  // key of the wrong kind
	ResBadVersion     Result = 0x2e  // blob of an unknown version
	ResBadLocality    Result = 0x3d  // locality out of range or refused
	ResRetry          Result = 0x800 // non-fatal: the requested blob does not exist
)

// Error makes a Result usable as an error; ResSuccess should not be used as one.
func (r Result) Error() string {
	switch r {
	case ResSuccess:
		return "success"
	case ResBadParameter:
		return "bad parameter (0x3)"
	case ResFail:
		return "failure (0x9)"
	case ResBadOrdinal:
		return "bad ordinal or wrong TPM state (0xa)"
	case ResKeyNotFound:
		return "key not found (0xd)"
	case ResSize:
		return "size (0x17)"
	case ResIOError:
		return "I/O error (0x1f)"
	case ResDecryptError:
		return "decrypt error (0x21)"
	case ResBadKeyProperty:
		return "bad key property (0x28)"
	case ResBadVersion:
		return "bad version (0x2e)"
	case ResBadLocality:
		return "bad locality (0x3d)"
	case ResRetry:
		return "blob does not exist (0x800)"
	}
	return fmt.Sprintf("control result 0x%x", uint32(r))
}

// Cap is the capability mask returned by GET_CAPABILITY (PTM_CAP_* bits).
type Cap uint64

// Capability bits (spec §1.3).
const (
	CapInit                Cap = 1 << 0
	CapShutdown            Cap = 1 << 1
	CapGetEstablished      Cap = 1 << 2
	CapSetLocality         Cap = 1 << 3
	CapHashing             Cap = 1 << 4 // HASH_START, HASH_DATA, HASH_END
	CapCancelTPMCmd        Cap = 1 << 5
	CapStoreVolatile       Cap = 1 << 6
	CapResetEstablished    Cap = 1 << 7
	CapGetStateBlob        Cap = 1 << 8
	CapSetStateBlob        Cap = 1 << 9
	CapStop                Cap = 1 << 10
	CapGetConfig           Cap = 1 << 11
	CapSetDataFD           Cap = 1 << 12
	CapSetBufferSize       Cap = 1 << 13
	CapGetInfo             Cap = 1 << 14
	CapSendCommandHeader   Cap = 1 << 15 // TPM 2 data channel accepts the TCG TPM_SEND_COMMAND prefix
	CapLockStorage         Cap = 1 << 16
	CapsTPM2Socket         Cap = 0x1ffff // what swtpm HEAD and nkp-swtpm report for a TPM 2 socket
	CapsQEMUMinimumTPM2    Cap = 0x348f  // what QEMU requires of a TPM 2 backend
	capsMigrationWithoutBl Cap = CapGetStateBlob | CapSetStateBlob | CapStop
)

// Migratable reports whether QEMU can migrate a VM whose backend reports c (otherwise it
// adds a migration blocker).
func (c Cap) Migratable() bool { return c&capsMigrationWithoutBl == capsMigrationWithoutBl }

// Flags of requests and responses.
const (
	InitDeleteVolatile uint32 = 1 // INIT: delete the volatile state after loading it

	StateFlagDecrypted uint32 = 1 // GET_STATEBLOB request: caller wants the blob decrypted
	StateFlagEncrypted uint32 = 2 // blob (or its inner layer) is encrypted with the state key

	ConfigFileKey      uint32 = 1 // GET_CONFIG: state files are encrypted with a key
	ConfigMigrationKey uint32 = 2 // GET_CONFIG: migration blobs are encrypted with a key
)

// BlobType names a state blob on GET/SET_STATEBLOB.
type BlobType uint32

// State blob types (PTM_BLOB_TYPE_*).
const (
	BlobPermanent BlobType = 1
	BlobVolatile  BlobType = 2
	BlobSaveState BlobType = 3
)

// Valid reports whether t is one of the three blob types.
func (t BlobType) Valid() bool { return t >= BlobPermanent && t <= BlobSaveState }

// String returns the libtpms name of the blob.
func (t BlobType) String() string {
	switch t {
	case BlobPermanent:
		return "permall"
	case BlobVolatile:
		return "volatilestate"
	case BlobSaveState:
		return "savestate"
	}
	return fmt.Sprintf("blobtype-%d", uint32(t))
}

// Limits of the control channel.
const (
	// MaxStateBlob is the largest SET_STATEBLOB payload accepted (swtpm's cap).
	MaxStateBlob = 512 * 1024
	// MaxHashData is the largest HASH_DATA payload in one message (ptm_hdata's buffer);
	// clients split longer data into several HASH_DATA messages.
	MaxHashData = 4096
	// MaxInfoChunk is the most JSON bytes one GET_INFO response carries (PTM_GETINFO_SIZE).
	MaxInfoChunk = 3 * 1024
	// ReadBuffer is how many bytes the server reads at once, as swtpm does (cmd + ptm_hdata).
	ReadBuffer = 4 + 4 + MaxHashData
)
