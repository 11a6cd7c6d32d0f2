package libtpms

import (
	"bytes"
	"fmt"
	"io/fs"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// memNVRAM is an in-memory NVRAM that records every call, so tests can see
// when libtpms loads and stores what.
type memNVRAM struct {
	mu       sync.Mutex
	blobs    map[string][]byte
	ops      []string // "load permall", "store permall", "delete volatilestate"
	tids     []int    // the thread each of ops ran on
	failNext error    // returned (once) by the next Store
}

func newMemNVRAM() *memNVRAM { return &memNVRAM{blobs: map[string][]byte{}} }

func (m *memNVRAM) Load(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ops = append(m.ops, "load "+name)
	m.tids = append(m.tids, syscall.Gettid())
	b, ok := m.blobs[name]
	if !ok {
		return nil, fmt.Errorf("mem nvram %q: %w", name, fs.ErrNotExist)
	}
	return bytes.Clone(b), nil
}

func (m *memNVRAM) Store(name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ops = append(m.ops, "store "+name)
	m.tids = append(m.tids, syscall.Gettid())
	if err := m.failNext; err != nil {
		m.failNext = nil
		return err
	}
	m.blobs[name] = bytes.Clone(data)
	return nil
}

func (m *memNVRAM) Delete(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ops = append(m.ops, "delete "+name)
	m.tids = append(m.tids, syscall.Gettid())
	if _, ok := m.blobs[name]; !ok {
		return fmt.Errorf("mem nvram %q: %w", name, fs.ErrNotExist)
	}
	delete(m.blobs, name)
	return nil
}

// takeOps returns the calls recorded since the last takeOps.
func (m *memNVRAM) takeOps() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	ops := m.ops
	m.ops = nil
	return ops
}

// takeTids returns the threads of the calls recorded since the last takeTids.
func (m *memNVRAM) takeTids() []int {
	m.mu.Lock()
	defer m.mu.Unlock()
	tids := m.tids
	m.tids = nil
	return tids
}

func (m *memNVRAM) blob(name string) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.blobs[name])
}

// countOps counts entries equal to op.
func countOps(ops []string, op string) int {
	n := 0
	for _, o := range ops {
		if o == op {
			n++
		}
	}
	return n
}

// transportOf adapts a TPM to go-tpm's transport.TPM.
type tpmTransport struct{ t *TPM }

func (x tpmTransport) Send(cmd []byte) ([]byte, error) { return x.t.Process(cmd) }

var _ transport.TPM = tpmTransport{}

// openTPM opens a TPM on nv and closes it when the test ends.
func openTPM(tb testing.TB, nv NVRAM) *TPM {
	tb.Helper()
	tpm, err := Open(nv)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { tpm.Close() })
	return tpm
}

// startTPM opens, initialises and starts (TPM2_Startup(CLEAR)) a TPM on nv.
func startTPM(tb testing.TB, nv NVRAM) *TPM {
	tb.Helper()
	tpm := openTPM(tb, nv)
	if err := tpm.MainInit(); err != nil {
		tb.Fatalf("MainInit: %v", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpmTransport{tpm}); err != nil {
		tb.Fatalf("TPM2_Startup(CLEAR): %v", err)
	}
	return tpm
}

const testNVIndex = tpm2.TPMHandle(0x01500001)

// defineNV defines a 64-byte owner-authorised NV index and returns its public area.
func defineNV(tb testing.TB, tpm *TPM, size uint16) tpm2.TPMSNVPublic {
	tb.Helper()
	def := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: testNVIndex,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{
				OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true,
				NT: tpm2.TPMNTOrdinary, NoDA: true,
			},
			DataSize: size,
		}),
	}
	if _, err := def.Execute(tpmTransport{tpm}); err != nil {
		tb.Fatalf("TPM2_NV_DefineSpace: %v", err)
	}
	pub, err := def.PublicInfo.Contents()
	if err != nil {
		tb.Fatalf("NV public: %v", err)
	}
	return *pub
}

// nvWrite writes data at offset 0 of the index with owner authorisation.
func nvWrite(tpm *TPM, pub tpm2.TPMSNVPublic, data []byte) error {
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return err
	}
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: pub.NVIndex, Name: *name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data},
	}.Execute(tpmTransport{tpm})
	return err
}

// nvRead reads size bytes of the index with owner authorisation.
func nvRead(tpm *TPM, index tpm2.TPMHandle, size uint16) ([]byte, error) {
	tr := tpmTransport{tpm}
	rp, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tr)
	if err != nil {
		return nil, err
	}
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: index, Name: rp.NVName},
		Size:       size,
	}.Execute(tr)
	if err != nil {
		return nil, err
	}
	return rsp.Data.Buffer, nil
}

// pcrRead reads one SHA-256 PCR.
func pcrRead(tpm *TPM, pcr uint) ([]byte, error) {
	rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{
		PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcr)}},
	}}.Execute(tpmTransport{tpm})
	if err != nil {
		return nil, err
	}
	if len(rsp.PCRValues.Digests) != 1 {
		return nil, fmt.Errorf("PCR_Read returned %d digests, want 1", len(rsp.PCRValues.Digests))
	}
	return rsp.PCRValues.Digests[0].Buffer, nil
}

// pcrExtend extends a SHA-256 PCR with digest.
func pcrExtend(tpm *TPM, pcr uint, digest []byte) error {
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
			HashAlg: tpm2.TPMAlgSHA256, Digest: digest,
		}}},
	}.Execute(tpmTransport{tpm})
	return err
}
