//go:build cgo

package libtpms

import (
	"bytes"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// recorder forwards to a TPM and keeps the last command's bytes, so a
// benchmark can replay the raw command without go-tpm's marshalling.
type recorder struct {
	t    *TPM
	last []byte
}

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.last = bytes.Clone(cmd)
	return r.t.Process(cmd)
}

var _ transport.TPM = (*recorder)(nil)

// benchProcess replays cmd b.N times and checks every response succeeded.
// If vary >= 0, the byte at cmd[vary] changes on every call.
func benchProcess(b *testing.B, tpm *TPM, cmd []byte, vary int) {
	b.Helper()
	b.ReportAllocs()
	for b.Loop() {
		if vary >= 0 {
			cmd[vary]++
		}
		rsp, err := tpm.Process(cmd)
		if err != nil {
			b.Fatal(err)
		}
		if rc := rsp[6:10]; !bytes.Equal(rc, []byte{0, 0, 0, 0}) {
			b.Fatalf("command failed with rc %x", rc)
		}
	}
}

func BenchmarkProcessGetRandom(b *testing.B) {
	tpm := startTPM(b, newMemNVRAM())
	rec := &recorder{t: tpm}
	if _, err := (tpm2.GetRandom{BytesRequested: 32}).Execute(rec); err != nil {
		b.Fatal(err)
	}
	benchProcess(b, tpm, rec.last, -1)
}

func BenchmarkProcessPCRExtend(b *testing.B) {
	tpm := startTPM(b, newMemNVRAM())
	rec := &recorder{t: tpm}
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}},
	}.Execute(rec)
	if err != nil {
		b.Fatal(err)
	}
	benchProcess(b, tpm, rec.last, -1)
}

// BenchmarkProcessNVWrite includes the permall store into the in-memory NVRAM
// (serialising ~2-5 KB); a real server adds its file write on top. The data
// changes on every write: libtpms skips the store when NV content is unchanged.
func BenchmarkProcessNVWrite(b *testing.B) {
	tpm := startTPM(b, newMemNVRAM())
	pub := defineNV(b, tpm, 64)
	rec := &recorder{t: tpm}
	name, err := tpm2.NVName(&pub)
	if err != nil {
		b.Fatal(err)
	}
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: pub.NVIndex, Name: *name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: bytes.Repeat([]byte{0x3c}, 64)},
	}.Execute(rec)
	if err != nil {
		b.Fatal(err)
	}
	// The command ends with the 64 data bytes and the u16 offset.
	benchProcess(b, tpm, rec.last, len(rec.last)-3)
}

// BenchmarkProcessCreatePrimaryECC times CreatePrimary (ECC P-256 storage
// key) plus the FlushContext of its handle, both as raw commands.
func BenchmarkProcessCreatePrimaryECC(b *testing.B) {
	tpm := startTPM(b, newMemNVRAM())
	rec := &recorder{t: tpm}
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(rec)
	if err != nil {
		b.Fatal(err)
	}
	create := rec.last
	if _, err := (tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}).Execute(rec); err != nil {
		b.Fatal(err)
	}
	flush := rec.last // the handle is the same each time: the slot is free again
	b.ReportAllocs()
	for b.Loop() {
		for _, cmd := range [][]byte{create, flush} {
			rsp, err := tpm.Process(cmd)
			if err != nil {
				b.Fatal(err)
			}
			if rc := rsp[6:10]; !bytes.Equal(rc, []byte{0, 0, 0, 0}) {
				b.Fatalf("command failed with rc %x", rc)
			}
		}
	}
}

// BenchmarkStateRoundTrip is what an outgoing plus incoming migration costs
// the engine: GetState of both blobs, Terminate, SetState, MainInit.
func BenchmarkStateRoundTrip(b *testing.B) {
	tpm := startTPM(b, newMemNVRAM())
	for b.Loop() {
		perm, err := tpm.GetState(Permanent)
		if err != nil {
			b.Fatal(err)
		}
		vol, err := tpm.GetState(Volatile)
		if err != nil {
			b.Fatal(err)
		}
		tpm.Terminate()
		if err := tpm.SetState(Permanent, perm); err != nil {
			b.Fatal(err)
		}
		if err := tpm.SetState(Volatile, vol); err != nil {
			b.Fatal(err)
		}
		if err := tpm.MainInit(); err != nil {
			b.Fatal(err)
		}
	}
}
