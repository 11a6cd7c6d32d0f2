package ctrl

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"testing"
)

func h(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// Every request survives Marshal then Parse, and its bytes are the ones swtpm expects.
func TestMarshalParseRoundTrip(t *testing.T) {
	tests := []struct {
		req  Request
		wire string
	}{
		{GetCapability{}, "00000001"},
		{Init{Flags: InitDeleteVolatile}, "00000002" + "00000001"},
		{Shutdown{}, "00000003"},
		{GetEstablished{}, "00000004"},
		{SetLocality{Loc: 3}, "00000005" + "03"},
		{SetLocality{Loc: 4, Padded: true}, "00000005" + "04000000"},
		{HashStart{}, "00000006"},
		{HashData{Data: []byte("abc")}, "00000007" + "00000003" + "616263"},
		{HashEnd{}, "00000008"},
		{CancelTPMCmd{}, "00000009"},
		{StoreVolatile{}, "0000000a"},
		{ResetEstablished{Loc: 3}, "0000000b" + "03"},
		{ResetEstablished{Loc: 3, Padded: true}, "0000000b" + "03000000"},
		{GetStateBlob{Flags: StateFlagDecrypted, Type: BlobVolatile, Offset: 7}, "0000000c" + "00000001" + "00000002" + "00000007"},
		{SetStateBlob{Flags: StateFlagEncrypted, Type: BlobPermanent, Data: []byte{1, 2}}, "0000000d" + "00000002" + "00000001" + "00000002" + "0102"},
		{Stop{}, "0000000e"},
		{GetConfig{}, "0000000f"},
		{SetDataFD{}, "00000010"},
		{SetBufferSize{Size: 4096}, "00000011" + "00001000"},
		{GetInfo{Flags: 3, Offset: 5}, "00000012" + "0000000000000003" + "00000005" + "00000000"},
		{LockStorage{Retries: 300}, "00000013" + "0000012c"},
	}
	for _, tt := range tests {
		t.Run(tt.req.Code().String(), func(t *testing.T) {
			b := tt.req.Marshal()
			if want := h(tt.wire); !bytes.Equal(b, want) {
				t.Fatalf("Marshal = %x, want %x", b, want)
			}
			got, need, err := Parse(b)
			if err != nil || need != 0 {
				t.Fatalf("Parse(%x) = need %d, err %v", b, need, err)
			}
			if !reflect.DeepEqual(got, tt.req) {
				t.Fatalf("Parse(%x) = %#v, want %#v", b, got, tt.req)
			}
		})
	}
}

// Every strict prefix of a request asks for more bytes, never for fewer than it has.
func TestParseNeedsMore(t *testing.T) {
	reqs := []Request{
		Init{}, SetLocality{Loc: 1}, ResetEstablished{Loc: 3}, HashData{Data: make([]byte, 100)},
		GetStateBlob{Type: BlobPermanent}, SetStateBlob{Type: BlobVolatile, Data: make([]byte, 9000)},
		SetBufferSize{Size: 1}, GetInfo{Flags: 1}, LockStorage{Retries: 1},
	}
	for _, r := range reqs {
		full := r.Marshal()
		for i := 0; i < len(full); i++ {
			got, need, err := Parse(full[:i])
			if err != nil || got != nil || need <= i || need > len(full) {
				t.Fatalf("%v: Parse(prefix %d of %d) = %v, need %d, err %v; want need in (%d, %d]",
					r.Code(), i, len(full), got, need, err, i, len(full))
			}
		}
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		res   Result
		close bool
	}{
		{"unknown command", "000000ff", ResBadOrdinal, false},
		{"zero command", "00000000", ResBadOrdinal, false},
		{"STOP with a body", "0000000e00", ResBadParameter, false},
		{"SHUTDOWN with a body", "0000000300000000", ResBadParameter, false},
		{"INIT with 5 body bytes", "000000020000000000", ResBadParameter, false},
		{"HASH_DATA longer than declared", "00000007000000010102", ResBadParameter, false},
		{"HASH_DATA over 4096", "0000000700001001", ResBadParameter, true},
		{"SET_STATEBLOB over 512 KiB", "0000000d000000000000000100080001", ResBadParameter, true},
		{"SET_STATEBLOB longer than declared", "0000000d00000000000000010000000001ff", ResBadParameter, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, need, err := Parse(h(tt.in))
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("Parse = %v, need %d, err %v; want *ParseError", req, need, err)
			}
			if pe.Result != tt.res || pe.Close != tt.close {
				t.Fatalf("ParseError = result %v close %v, want %v close %v", pe.Result, pe.Close, tt.res, tt.close)
			}
			if got := (ResultResponse{Result: pe.Result}).Marshal(); len(got) != 4 {
				t.Fatalf("error reply is %d bytes, want 4", len(got))
			}
		})
	}
}

// Padding after the commands that tolerate it is swallowed, as swtpm does for QEMU.
func TestParseToleratesPadding(t *testing.T) {
	tests := []struct {
		in   string
		want Request
	}{
		{"00000005" + "02ffffff", SetLocality{Loc: 2, Padded: true}},
		{"0000000b" + "04000000", ResetEstablished{Loc: 4, Padded: true}},
		{"00000011" + "00000f80" + "00", SetBufferSize{Size: 3968}},
		{"00000001" + "00000001", GetCapability{}},
	}
	for _, tt := range tests {
		got, need, err := Parse(h(tt.in))
		if err != nil || need != 0 || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("Parse(%s) = %#v, %d, %v; want %#v", tt.in, got, need, err, tt.want)
		}
	}
}

func TestIncomplete(t *testing.T) {
	tests := []struct {
		in             string
		code           Code
		close, noReply bool
	}{
		{"", 0, false, true},
		{"000000", 0, false, true},
		{"00000002" + "00", CmdInit, false, true},
		{"00000005", CmdSetLocality, false, true},
		{"00000007" + "00000010" + "01", CmdHashData, true, true},
		{"0000000b", CmdResetEstablished, false, true},
		{"0000000c" + "00", CmdGetStateBlob, false, true},
		{"0000000d" + "00000000" + "00000001" + "00000010" + "01", CmdSetStateBlob, true, true},
		{"0000000d" + "00000000", CmdSetStateBlob, false, true},
		// swtpm reads these once and answers BAD_PARAMETER on the same connection.
		{"00000011", CmdSetBufferSize, false, false},
		{"00000012" + "00000000", CmdGetInfo, false, false},
		{"00000013" + "00", CmdLockStorage, false, false},
	}
	for _, tt := range tests {
		e := Incomplete(h(tt.in))
		if e.Result != ResBadParameter || e.Code != tt.code || e.Close != tt.close || e.NoReply != tt.noReply {
			t.Errorf("Incomplete(%s) = %+v; want code %v close %v noReply %v", tt.in, e, tt.code, tt.close, tt.noReply)
		}
	}
}

// Responses have swtpm's exact sizes and layouts.
func TestResponseLayouts(t *testing.T) {
	tests := []struct {
		name string
		resp Response
		wire string
	}{
		{"capabilities", CapabilityResponse{Caps: CapsTPM2Socket}, "000000000001ffff"},
		{"result", ResultResponse{Result: ResBadLocality}, "0000003d"},
		{"established", EstablishedResponse{Bit: true}, "0000000001000000"},
		{"state blob", StateBlobResponse{Flags: 0, Data: []byte{9, 8}}, "00000000" + "00000000" + "00000002" + "00000002" + "0908"},
		{"absent blob", StateBlobResponse{Result: ResRetry}, "00000800" + "00000000" + "00000000" + "00000000"},
		{"config", ConfigResponse{Flags: ConfigFileKey | ConfigMigrationKey}, "0000000000000003"},
		{"buffer size", BufferSizeResponse{Size: 4096, Min: 2808, Max: 4096}, "00000000" + "00001000" + "00000af8" + "00001000"},
		{"info", InfoResponse{TotLength: 3, Data: []byte("{}\x00")}, "00000000" + "00000003" + "00000003" + "7b7d00"},
	}
	for _, tt := range tests {
		if got := tt.resp.Marshal(); !bytes.Equal(got, h(tt.wire)) {
			t.Errorf("%s: Marshal = %x, want %s", tt.name, got, tt.wire)
		}
	}
}

func TestReadResponse(t *testing.T) {
	tests := []struct {
		name string
		code Code
		wire string
		want Response
	}{
		{"capability", CmdGetCapability, "000000000001ffff", CapabilityResponse{Caps: CapsTPM2Socket}},
		{"short error stops after 4 bytes", CmdSetBufferSize, "0000000a", ResultResponse{Result: ResBadOrdinal}},
		{"buffer size", CmdSetBufferSize, "00000000000010000000 0af800001000", BufferSizeResponse{Size: 4096, Min: 2808, Max: 4096}},
		{"absent blob", CmdGetStateBlob, "00000800000000000000000000000000", StateBlobResponse{Result: ResRetry, Data: []byte{}}},
		{"blob not running", CmdGetStateBlob, "0000000a", StateBlobResponse{Result: ResBadOrdinal}},
		{"established", CmdGetEstablished, "0000000000000000", EstablishedResponse{}},
		{"info", CmdGetInfo, "00000000000000030000000361620a", InfoResponse{TotLength: 3, Data: []byte("ab\n")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wire := h(string(bytes.ReplaceAll([]byte(tt.wire), []byte(" "), nil)))
			r := bytes.NewReader(wire)
			got, err := ReadResponse(r, tt.code)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ReadResponse = %#v, want %#v", got, tt.want)
			}
			if r.Len() != 0 {
				t.Fatalf("%d bytes left unread", r.Len())
			}
		})
	}
}

func TestCaps(t *testing.T) {
	if !CapsTPM2Socket.Migratable() || CapsQEMUMinimumTPM2&CapsTPM2Socket != CapsQEMUMinimumTPM2 {
		t.Fatalf("caps %#x must be migratable and include QEMU's minimum %#x", CapsTPM2Socket, CapsQEMUMinimumTPM2)
	}
	if CapLockStorage|CapSendCommandHeader|CapSetDataFD != CapsTPM2Socket&(CapLockStorage|CapSendCommandHeader|CapSetDataFD) {
		t.Fatalf("caps %#x lack LOCK_STORAGE, SEND_COMMAND_HEADER or SET_DATAFD", CapsTPM2Socket)
	}
}
