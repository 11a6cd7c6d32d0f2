package ctrl

import "fmt"

// ParseError is a request the server refuses with the 4-byte reply Result, as swtpm does.
type ParseError struct {
	Code   Code   // the request's command code; 0 if fewer than 4 bytes arrived
	Result Result // what to reply
	Reason string
	// Close is set when the byte stream cannot be resynchronised (a payload whose
	// declared length is refused, or that stopped arriving midway): the server replies
	// and then closes the connection.
	Close bool
	// NoReply is set by Incomplete for the requests swtpm waits for in full (fewer
	// than 4 bytes, INIT, SET_LOCALITY, HASH_DATA, RESET_TPMESTABLISHED, GET_STATEBLOB,
	// SET_STATEBLOB): when the rest does not come, swtpm closes the connection without
	// a reply, and so must the server.
	NoReply bool
}

// Error implements error.
func (e *ParseError) Error() string {
	return fmt.Sprintf("control request %v: %s: reply %v", e.Code, e.Reason, e.Result)
}

// Parse frames one control request from b, the bytes read from the stream so far
// (swtpm's control channel has no length prefix: the command code says how much follows).
//
//   - need > 0: b is incomplete; the request needs at least need bytes in total. The
//     caller reads more within its deadline and calls Parse again with all bytes, or,
//     when nothing more arrives in time, replies with Incomplete(b) (or closes the
//     connection without a reply when its NoReply is set).
//   - err != nil: it is a *ParseError; reply with its Result.
//   - otherwise req is the complete request.
//
// Like swtpm, Parse accepts trailing bytes after SET_LOCALITY, RESET_TPMESTABLISHED,
// GET_STATEBLOB, SET_BUFFERSIZE, GET_INFO, LOCK_STORAGE, GET_CAPABILITY and SET_DATAFD
// (QEMU pads the locality commands to 4 bytes of body), and refuses them after commands
// whose body is fixed (INIT, STOP, SHUTDOWN, ...) and after HASH_DATA and SET_STATEBLOB
// payloads. The caller must pass everything it read in one go: there is no pipelining
// on this channel, so bytes beyond a request belong to it.
func Parse(b []byte) (req Request, need int, err error) {
	if len(b) < 4 {
		return nil, 4, nil
	}
	c := Code(be.Uint32(b))
	body := b[4:]
	n := len(body)
	bad := func(reason string) (Request, int, error) {
		return nil, 0, &ParseError{Code: c, Result: ResBadParameter, Reason: reason}
	}
	empty := func(r Request) (Request, int, error) {
		if n != 0 {
			return bad(fmt.Sprintf("%d unexpected body bytes", n))
		}
		return r, 0, nil
	}
	atLeast := func(k int) bool { return n >= k }

	switch c {
	case CmdGetCapability:
		return GetCapability{}, 0, nil
	case CmdSetDataFD:
		return SetDataFD{}, 0, nil
	case CmdShutdown:
		return empty(Shutdown{})
	case CmdGetEstablished:
		return empty(GetEstablished{})
	case CmdHashStart:
		return empty(HashStart{})
	case CmdHashEnd:
		return empty(HashEnd{})
	case CmdCancelTPMCmd:
		return empty(CancelTPMCmd{})
	case CmdStoreVolatile:
		return empty(StoreVolatile{})
	case CmdStop:
		return empty(Stop{})
	case CmdGetConfig:
		return empty(GetConfig{})
	case CmdInit:
		if !atLeast(4) {
			return nil, 8, nil
		}
		if n != 4 {
			return bad(fmt.Sprintf("body of %d bytes, want 4", n))
		}
		return Init{Flags: be.Uint32(body)}, 0, nil
	case CmdSetLocality:
		if !atLeast(1) {
			return nil, 5, nil
		}
		return SetLocality{Loc: body[0], Padded: n >= 4}, 0, nil
	case CmdResetEstablished:
		if !atLeast(1) {
			return nil, 5, nil
		}
		return ResetEstablished{Loc: body[0], Padded: n >= 4}, 0, nil
	case CmdHashData:
		if !atLeast(4) {
			return nil, 8, nil
		}
		l := be.Uint32(body)
		if l > MaxHashData {
			return nil, 0, &ParseError{Code: c, Result: ResBadParameter, Close: true,
				Reason: fmt.Sprintf("length %d exceeds %d (split the data into several HASH_DATA messages)", l, MaxHashData)}
		}
		total := 8 + int(l)
		if len(b) < total {
			return nil, total, nil
		}
		if len(b) > total {
			return bad(fmt.Sprintf("%d bytes beyond the declared length %d", len(b)-total, l))
		}
		return HashData{Data: body[4 : total-4]}, 0, nil
	case CmdGetStateBlob:
		if !atLeast(12) {
			return nil, 16, nil
		}
		return GetStateBlob{Flags: be.Uint32(body), Type: BlobType(be.Uint32(body[4:])), Offset: be.Uint32(body[8:])}, 0, nil
	case CmdSetStateBlob:
		if !atLeast(12) {
			return nil, 16, nil
		}
		l := be.Uint32(body[8:])
		if l > MaxStateBlob {
			return nil, 0, &ParseError{Code: c, Result: ResBadParameter, Close: true,
				Reason: fmt.Sprintf("blob length %d exceeds %d", l, MaxStateBlob)}
		}
		total := 16 + int(l)
		if len(b) < total {
			return nil, total, nil
		}
		if len(b) > total {
			return bad(fmt.Sprintf("%d bytes beyond the declared blob length %d", len(b)-total, l))
		}
		return SetStateBlob{Flags: be.Uint32(body), Type: BlobType(be.Uint32(body[4:])), Data: body[12:]}, 0, nil
	case CmdSetBufferSize:
		if !atLeast(4) {
			return nil, 8, nil
		}
		return SetBufferSize{Size: be.Uint32(body)}, 0, nil
	case CmdGetInfo:
		if !atLeast(16) {
			return nil, 20, nil
		}
		return GetInfo{Flags: be.Uint64(body), Offset: be.Uint32(body[8:])}, 0, nil
	case CmdLockStorage:
		if !atLeast(4) {
			return nil, 8, nil
		}
		return LockStorage{Retries: be.Uint32(body)}, 0, nil
	}
	return nil, 0, &ParseError{Code: c, Result: ResBadOrdinal, Reason: "unknown command"}
}

// Incomplete is the error for a request whose bytes b stopped arriving before Parse was
// satisfied (the peer went quiet past the deadline, or closed its write side).
//
// swtpm 0.7.1 waits (up to 500 ms) for the whole of the command code, INIT,
// SET_LOCALITY, HASH_DATA, RESET_TPMESTABLISHED, GET_STATEBLOB and SET_STATEBLOB and
// closes the connection without a reply when they stop short (NoReply). It reads the
// other requests once and answers BAD_PARAMETER when their body is short
// (SET_BUFFERSIZE, GET_INFO; LOCK_STORAGE in the swtpm versions that have it), and the
// connection stays usable. When a HASH_DATA or SET_STATEBLOB payload was cut midway the
// stream is lost and the connection must be closed (Close).
func Incomplete(b []byte) *ParseError {
	e := &ParseError{Result: ResBadParameter, Reason: fmt.Sprintf("truncated after %d bytes", len(b)), NoReply: true}
	if len(b) >= 4 {
		e.Code = Code(be.Uint32(b))
		switch e.Code {
		case CmdSetBufferSize, CmdGetInfo, CmdLockStorage:
			e.NoReply = false
		}
		switch {
		case e.Code == CmdHashData && len(b) > 8, e.Code == CmdSetStateBlob && len(b) > 16:
			e.Close = true
		}
	}
	return e
}
