package ctrl

import (
	"encoding/binary"
	"fmt"
	"io"
)

var be = binary.BigEndian

// Request is one control channel request. Marshal encodes it as a client sends it,
// command code included.
type Request interface {
	Code() Code
	Marshal() []byte
}

// Requests without a body.
type (
	// GetCapability asks for the capability mask (CapabilityResponse).
	GetCapability struct{}
	// Shutdown stops the TPM and ends the server after the reply (ResultResponse).
	Shutdown struct{}
	// GetEstablished reads the TPM established bit (EstablishedResponse).
	GetEstablished struct{}
	// HashStart begins a locality-4 _TPM_Hash_Start sequence (ResultResponse).
	HashStart struct{}
	// HashEnd ends the hash sequence and sets the established bit (ResultResponse).
	HashEnd struct{}
	// CancelTPMCmd asks to cancel the TPM command in flight (ResultResponse).
	CancelTPMCmd struct{}
	// StoreVolatile writes the volatile state to the state store (ResultResponse).
	StoreVolatile struct{}
	// Stop shuts the TPM down without ending the server (ResultResponse).
	Stop struct{}
	// GetConfig asks which keys are configured (ConfigResponse).
	GetConfig struct{}
	// SetDataFD carries the data channel's file descriptor as SCM_RIGHTS ancillary
	// data of the same message (ResultResponse). The fd itself is not part of the bytes.
	SetDataFD struct{}
)

// Code implements Request.
func (GetCapability) Code() Code { return CmdGetCapability }

// Code implements Request.
func (Shutdown) Code() Code { return CmdShutdown }

// Code implements Request.
func (GetEstablished) Code() Code { return CmdGetEstablished }

// Code implements Request.
func (HashStart) Code() Code { return CmdHashStart }

// Code implements Request.
func (HashEnd) Code() Code { return CmdHashEnd }

// Code implements Request.
func (CancelTPMCmd) Code() Code { return CmdCancelTPMCmd }

// Code implements Request.
func (StoreVolatile) Code() Code { return CmdStoreVolatile }

// Code implements Request.
func (Stop) Code() Code { return CmdStop }

// Code implements Request.
func (GetConfig) Code() Code { return CmdGetConfig }

// Code implements Request.
func (SetDataFD) Code() Code { return CmdSetDataFD }

// Marshal implements Request.
func (r GetCapability) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r Shutdown) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r GetEstablished) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r HashStart) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r HashEnd) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r CancelTPMCmd) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r StoreVolatile) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r Stop) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r GetConfig) Marshal() []byte { return header(r.Code(), 0) }

// Marshal implements Request.
func (r SetDataFD) Marshal() []byte { return header(r.Code(), 0) }

// Init (re)starts the TPM: auto-shutdown, terminate, load the state, run (ResultResponse).
type Init struct {
	Flags uint32 // InitDeleteVolatile
}

// Code implements Request.
func (Init) Code() Code { return CmdInit }

// Marshal implements Request.
func (r Init) Marshal() []byte {
	b := header(r.Code(), 4)
	be.PutUint32(b[4:], r.Flags)
	return b
}

// SetLocality sets the locality of the following TPM commands (ResultResponse).
type SetLocality struct {
	Loc uint8
	// Padded encodes a 4-byte body (1 byte + 3 bytes of padding) as QEMU sends it;
	// otherwise the body is 1 byte as swtpm_ioctl and tpm2-tss send it.
	Padded bool
}

// Code implements Request.
func (SetLocality) Code() Code { return CmdSetLocality }

// Marshal implements Request.
func (r SetLocality) Marshal() []byte { return locBody(r.Code(), r.Loc, r.Padded) }

// ResetEstablished resets the established bit from locality Loc (ResultResponse).
type ResetEstablished struct {
	Loc    uint8
	Padded bool // as in SetLocality
}

// Code implements Request.
func (ResetEstablished) Code() Code { return CmdResetEstablished }

// Marshal implements Request.
func (r ResetEstablished) Marshal() []byte { return locBody(r.Code(), r.Loc, r.Padded) }

// HashData feeds data to the hash sequence started by HashStart (ResultResponse).
type HashData struct {
	Data []byte // at most MaxHashData bytes per message
}

// Code implements Request.
func (HashData) Code() Code { return CmdHashData }

// Marshal implements Request.
func (r HashData) Marshal() []byte {
	b := header(r.Code(), 4+len(r.Data))
	be.PutUint32(b[4:], uint32(len(r.Data)))
	copy(b[8:], r.Data)
	return b
}

// GetStateBlob reads one state blob of a running TPM (StateBlobResponse).
type GetStateBlob struct {
	Flags  uint32 // StateFlagDecrypted
	Type   BlobType
	Offset uint32
}

// Code implements Request.
func (GetStateBlob) Code() Code { return CmdGetStateBlob }

// Marshal implements Request.
func (r GetStateBlob) Marshal() []byte {
	b := header(r.Code(), 12)
	be.PutUint32(b[4:], r.Flags)
	be.PutUint32(b[8:], uint32(r.Type))
	be.PutUint32(b[12:], r.Offset)
	return b
}

// SetStateBlob hands one state blob to a stopped TPM; it is used at the next INIT
// (ResultResponse). Empty Data clears the blob.
type SetStateBlob struct {
	Flags uint32 // StateFlagEncrypted
	Type  BlobType
	Data  []byte // at most MaxStateBlob bytes
}

// Code implements Request.
func (SetStateBlob) Code() Code { return CmdSetStateBlob }

// Marshal implements Request.
func (r SetStateBlob) Marshal() []byte {
	b := header(r.Code(), 12+len(r.Data))
	be.PutUint32(b[4:], r.Flags)
	be.PutUint32(b[8:], uint32(r.Type))
	be.PutUint32(b[12:], uint32(len(r.Data)))
	copy(b[16:], r.Data)
	return b
}

// SetBufferSize sets (stopped TPM) or queries (Size 0) the TPM's I/O buffer size
// (BufferSizeResponse).
type SetBufferSize struct {
	Size uint32
}

// Code implements Request.
func (SetBufferSize) Code() Code { return CmdSetBufferSize }

// Marshal implements Request.
func (r SetBufferSize) Marshal() []byte {
	b := header(r.Code(), 4)
	be.PutUint32(b[4:], r.Size)
	return b
}

// GetInfo reads libtpms' JSON information from Offset (InfoResponse).
type GetInfo struct {
	Flags  uint64 // 1 spec, 2 attributes, 4 features, 8 algorithms, 0x10 commands, ...
	Offset uint32
}

// Code implements Request.
func (GetInfo) Code() Code { return CmdGetInfo }

// Marshal implements Request.
func (r GetInfo) Marshal() []byte {
	b := header(r.Code(), 16)
	be.PutUint64(b[4:], r.Flags)
	be.PutUint32(b[12:], r.Offset)
	return b
}

// LockStorage (re)acquires the state store's lock, trying Retries times 10 ms apart
// (ResultResponse).
type LockStorage struct {
	Retries uint32
}

// Code implements Request.
func (LockStorage) Code() Code { return CmdLockStorage }

// Marshal implements Request.
func (r LockStorage) Marshal() []byte {
	b := header(r.Code(), 4)
	be.PutUint32(b[4:], r.Retries)
	return b
}

func header(c Code, body int) []byte {
	b := make([]byte, 4+body)
	be.PutUint32(b, uint32(c))
	return b
}

func locBody(c Code, loc uint8, padded bool) []byte {
	n := 1
	if padded {
		n = 4
	}
	b := header(c, n)
	b[4] = loc
	return b
}

// Response is one control channel response as the server writes it.
type Response interface {
	Marshal() []byte
}

// ResultResponse is the 4-byte response of most commands, and the short error reply of
// every command.
type ResultResponse struct {
	Result Result
}

// Marshal implements Response.
func (r ResultResponse) Marshal() []byte {
	b := make([]byte, 4)
	be.PutUint32(b, uint32(r.Result))
	return b
}

// CapabilityResponse answers GET_CAPABILITY: 8 bytes, which QEMU reads as one be64 so the
// (always zero) result lands in the high half.
type CapabilityResponse struct {
	Caps Cap
}

// Marshal implements Response.
func (r CapabilityResponse) Marshal() []byte {
	b := make([]byte, 8)
	be.PutUint64(b, uint64(r.Caps))
	return b
}

// EstablishedResponse answers GET_TPMESTABLISHED: result, bit, 3 bytes of padding.
type EstablishedResponse struct {
	Result Result
	Bit    bool
}

// Marshal implements Response.
func (r EstablishedResponse) Marshal() []byte {
	b := make([]byte, 8)
	be.PutUint32(b, uint32(r.Result))
	if r.Bit {
		b[4] = 1
	}
	return b
}

// StateBlobResponse answers GET_STATEBLOB: result, flags, totlength, length, data.
// swtpm sends totlength == length == len(Data) in one response.
type StateBlobResponse struct {
	Result Result
	Flags  uint32 // StateFlagEncrypted
	Data   []byte
}

// Marshal implements Response.
func (r StateBlobResponse) Marshal() []byte {
	b := make([]byte, 16+len(r.Data))
	be.PutUint32(b, uint32(r.Result))
	be.PutUint32(b[4:], r.Flags)
	be.PutUint32(b[8:], uint32(len(r.Data)))
	be.PutUint32(b[12:], uint32(len(r.Data)))
	copy(b[16:], r.Data)
	return b
}

// ConfigResponse answers GET_CONFIG.
type ConfigResponse struct {
	Result Result
	Flags  uint32 // ConfigFileKey | ConfigMigrationKey
}

// Marshal implements Response.
func (r ConfigResponse) Marshal() []byte {
	b := make([]byte, 8)
	be.PutUint32(b, uint32(r.Result))
	be.PutUint32(b[4:], r.Flags)
	return b
}

// BufferSizeResponse answers SET_BUFFERSIZE.
type BufferSizeResponse struct {
	Result         Result
	Size, Min, Max uint32
}

// Marshal implements Response.
func (r BufferSizeResponse) Marshal() []byte {
	b := make([]byte, 16)
	be.PutUint32(b, uint32(r.Result))
	be.PutUint32(b[4:], r.Size)
	be.PutUint32(b[8:], r.Min)
	be.PutUint32(b[12:], r.Max)
	return b
}

// InfoResponse answers GET_INFO: result, totlength (the JSON's length including its
// NUL), length, then this chunk of the NUL-terminated JSON.
type InfoResponse struct {
	Result    Result
	TotLength uint32
	Data      []byte
}

// Marshal implements Response.
func (r InfoResponse) Marshal() []byte {
	b := make([]byte, 12+len(r.Data))
	be.PutUint32(b, uint32(r.Result))
	be.PutUint32(b[4:], r.TotLength)
	be.PutUint32(b[8:], uint32(len(r.Data)))
	copy(b[12:], r.Data)
	return b
}

// ReadResponse reads the response to a request with code c from r, as a client does:
// it reads the result first and, if it is not success, stops there (as QEMU ≥ 9.2 does).
// GET_CAPABILITY has no result field; GET_STATEBLOB is read by ReadStateBlobResponse.
// It is meant for tests and tools, not for the server.
func ReadResponse(r io.Reader, c Code) (Response, error) {
	if c == CmdGetStateBlob {
		return ReadStateBlobResponse(r)
	}
	if c == CmdGetCapability {
		var b [8]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return nil, fmt.Errorf("control response to %v: %w", c, err)
		}
		return CapabilityResponse{Caps: Cap(be.Uint64(b[:]))}, nil
	}
	var hb [4]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return nil, fmt.Errorf("control response to %v: %w", c, err)
	}
	res := Result(be.Uint32(hb[:]))
	if res != ResSuccess {
		return ResultResponse{Result: res}, nil
	}
	rest := func(n int) ([]byte, error) {
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, fmt.Errorf("control response to %v: %w", c, err)
		}
		return b, nil
	}
	switch c {
	case CmdGetEstablished:
		b, err := rest(4)
		if err != nil {
			return nil, err
		}
		return EstablishedResponse{Result: res, Bit: b[0] != 0}, nil
	case CmdGetConfig:
		b, err := rest(4)
		if err != nil {
			return nil, err
		}
		return ConfigResponse{Result: res, Flags: be.Uint32(b)}, nil
	case CmdSetBufferSize:
		b, err := rest(12)
		if err != nil {
			return nil, err
		}
		return BufferSizeResponse{Result: res, Size: be.Uint32(b), Min: be.Uint32(b[4:]), Max: be.Uint32(b[8:])}, nil
	case CmdGetInfo:
		b, err := rest(8)
		if err != nil {
			return nil, err
		}
		n := be.Uint32(b[4:])
		if n > MaxInfoChunk {
			return nil, fmt.Errorf("control response to %v: chunk of %d bytes exceeds %d", c, n, MaxInfoChunk)
		}
		d, err := rest(int(n))
		if err != nil {
			return nil, err
		}
		return InfoResponse{Result: res, TotLength: be.Uint32(b), Data: d}, nil
	}
	return ResultResponse{Result: res}, nil
}

// ReadStateBlobResponse reads a GET_STATEBLOB response, which is the 4-byte error reply
// when the TPM is not running (BAD_ORDINAL) or the request was malformed
// (BAD_PARAMETER), and the 16-byte header otherwise (also for 0x800, blob absent).
func ReadStateBlobResponse(r io.Reader) (StateBlobResponse, error) {
	var hb [4]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return StateBlobResponse{}, fmt.Errorf("control response to GET_STATEBLOB: %w", err)
	}
	res := Result(be.Uint32(hb[:]))
	if res == ResBadOrdinal || res == ResBadParameter {
		return StateBlobResponse{Result: res}, nil
	}
	var b [12]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return StateBlobResponse{}, fmt.Errorf("control response to GET_STATEBLOB: %w", err)
	}
	tot, n := be.Uint32(b[4:]), be.Uint32(b[8:])
	if tot != n || n > MaxStateBlob {
		return StateBlobResponse{}, fmt.Errorf("control response to GET_STATEBLOB: totlength %d, length %d: want equal and at most %d", tot, n, MaxStateBlob)
	}
	d := make([]byte, n)
	if _, err := io.ReadFull(r, d); err != nil {
		return StateBlobResponse{}, fmt.Errorf("control response to GET_STATEBLOB: %w", err)
	}
	return StateBlobResponse{Result: res, Flags: be.Uint32(b[:]), Data: d}, nil
}
