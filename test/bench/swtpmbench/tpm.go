package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// dataConn is a TPM 2.0 data channel on a unix socket: one command written,
// then the 10-byte header and the rest of the response read by its size.
type dataConn struct {
	c   net.Conn
	buf []byte
}

func dialData(path string) (*dataConn, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return nil, fmt.Errorf("data socket %s: %w", path, err)
	}
	return &dataConn{c: c, buf: make([]byte, 4096)}, nil
}

// roundTrip sends cmd and returns the response in a buffer reused by the
// next call.
func (d *dataConn) roundTrip(cmd []byte) ([]byte, error) {
	if _, err := d.c.Write(cmd); err != nil {
		return nil, fmt.Errorf("sending TPM command: %w", err)
	}
	if _, err := io.ReadFull(d.c, d.buf[:10]); err != nil {
		return nil, fmt.Errorf("reading TPM response header: %w", err)
	}
	size := int(binary.BigEndian.Uint32(d.buf[2:6]))
	if size < 10 || size > len(d.buf) {
		return nil, fmt.Errorf("TPM response size %d out of range", size)
	}
	if _, err := io.ReadFull(d.c, d.buf[10:size]); err != nil {
		return nil, fmt.Errorf("reading TPM response body: %w", err)
	}
	return d.buf[:size], nil
}

// Send implements go-tpm's transport.TPM, for setup commands.
func (d *dataConn) Send(cmd []byte) ([]byte, error) {
	rsp, err := d.roundTrip(cmd)
	return bytes.Clone(rsp), err
}

func (d *dataConn) Close() error { return d.c.Close() }

var _ transport.TPM = (*dataConn)(nil)

// responseCode is the rc field of a response.
func responseCode(rsp []byte) uint32 { return binary.BigEndian.Uint32(rsp[6:10]) }

// capture records the bytes go-tpm marshals for a command without sending
// them: the benchmark replays raw bytes so that both backends see identical
// commands and the client adds no marshalling time.
type capture struct{ cmd []byte }

func (c *capture) Send(cmd []byte) ([]byte, error) {
	c.cmd = bytes.Clone(cmd)
	return nil, errCaptured
}

var errCaptured = fmt.Errorf("captured")

// commandBytes returns the wire bytes of a go-tpm command.
func commandBytes(exec func(transport.TPM) error) []byte {
	c := &capture{}
	_ = exec(c)
	return c.cmd
}

// benchNVIndex is the NV index the NV_Write benchmark defines in each backend.
const benchNVIndex = tpm2.TPMHandle(0x01500020)

// nvPublic is the 64-byte owner-authorised ordinary index written by NV_Write.
func nvPublic() tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{
		NVIndex: benchNVIndex,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true,
			NT: tpm2.TPMNTOrdinary, NoDA: true,
		},
		DataSize: 64,
	}
}

// defineNV defines the benchmark's NV index on a started TPM.
func defineNV(t transport.TPM) error {
	_, err := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(nvPublic()),
	}.Execute(t)
	if err != nil {
		return fmt.Errorf("TPM2_NV_DefineSpace 0x%x: %w", uint32(benchNVIndex), err)
	}
	return nil
}

// commands holds the raw commands the benchmark replays.
type commands struct {
	getRandom     []byte
	pcrExtend     []byte
	nvWrite       []byte // its last data byte is at len-3 and changes per call
	createPrimary []byte
}

func buildCommands() (commands, error) {
	var c commands
	c.getRandom = commandBytes(func(t transport.TPM) error {
		_, err := tpm2.GetRandom{BytesRequested: 32}.Execute(t)
		return err
	})
	c.pcrExtend = commandBytes(func(t transport.TPM) error {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
				HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{0x11}, 32),
			}}},
		}.Execute(t)
		return err
	})
	pub := nvPublic()
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return c, fmt.Errorf("NV name: %w", err)
	}
	c.nvWrite = commandBytes(func(t transport.TPM) error {
		_, err := tpm2.NVWrite{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: benchNVIndex, Name: *name},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: bytes.Repeat([]byte{0x5c}, 64)},
		}.Execute(t)
		return err
	})
	c.createPrimary = commandBytes(func(t transport.TPM) error {
		_, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.TPMRHOwner,
			InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate), // ECC NIST P-256
		}.Execute(t)
		return err
	})
	for n, b := range map[string][]byte{"GetRandom": c.getRandom, "PCR_Extend": c.pcrExtend, "NV_Write": c.nvWrite, "CreatePrimary": c.createPrimary} {
		if len(b) < 10 {
			return c, fmt.Errorf("could not marshal %s", n)
		}
	}
	return c, nil
}

// flushCommand is TPM2_FlushContext(handle).
func flushCommand(handle uint32) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x65, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[10:], handle)
	return b
}
