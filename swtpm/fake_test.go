package swtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"sync"

	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
)

// Fake TPM command codes the fake engine answers besides Startup, Shutdown, GetRandom.
const (
	ccNVWrite = 0x137 // fake: the command's parameters become the NV value
	ccNVRead  = 0x14e // fake: returns the NV value
)

// fakeEngine is a TPM that answers a few commands plausibly and records every call.
// Its permanent state is one NV value; it writes it through its NVRAM on NV_Write and
// Shutdown, before answering, as libtpms does.
type fakeEngine struct {
	nv *memStore

	mu          sync.Mutex
	calls       []string
	running     bool
	started     bool // TPM2_Startup done
	nvValue     []byte
	pending     map[libtpms.StateType][]byte
	locality    uint8
	established bool
	bufSize     uint32
	hashing     bool
}

func newFakeEngine(nv *memStore) *fakeEngine {
	return &fakeEngine{nv: nv, bufSize: 4096, pending: map[libtpms.StateType][]byte{}}
}

func (f *fakeEngine) record(format string, args ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

// Calls returns the calls so far.
func (f *fakeEngine) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeEngine) SetState(typ libtpms.StateType, blob []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("SetState %s %d", typ, len(blob))
	if f.running {
		return libtpms.ErrRunning
	}
	if string(blob) == "reject" { // as libtpms: refuse, and drop what was set before
		f.pending = map[libtpms.StateType][]byte{}
		return fmt.Errorf("fake: %w", libtpms.ResultBadParameter)
	}
	f.pending[typ] = append([]byte{}, blob...)
	return nil
}

func (f *fakeEngine) GetState(typ libtpms.StateType) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("GetState %s", typ)
	switch typ {
	case libtpms.Permanent:
		return append([]byte("perm:"), f.nvValue...), nil
	case libtpms.Volatile:
		if f.started {
			return []byte("vol:started"), nil
		}
		return []byte("vol:"), nil
	}
	return nil, libtpms.ErrNoState
}

func (f *fakeEngine) MainInit() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("MainInit")
	perm, ok := f.pending[libtpms.Permanent]
	if !ok {
		b, err := f.nv.Load("permall")
		switch {
		case errors.Is(err, fs.ErrNotExist):
			b = []byte("perm:") // manufacture
		case err != nil:
			return fmt.Errorf("fake: load permall: %w", err)
		}
		perm = b
	} else if len(perm) >= 5 && string(perm[:5]) == "perm:" {
		// As libtpms: MainInit stores a permanent state set by SetState through the NVRAM
		// (swtpm/internal/libtpms TestStateRoundTrip checks the real one).
		if err := f.nv.Store("permall", perm); err != nil {
			return fmt.Errorf("fake: store permall: %w", err)
		}
	}
	if len(perm) < 5 || string(perm[:5]) != "perm:" {
		return fmt.Errorf("fake: corrupt permanent state: %w", libtpms.ResultFail)
	}
	vol, ok := f.pending[libtpms.Volatile]
	if !ok {
		vol, _ = f.nv.Load("volatilestate")
	}
	f.nvValue = append([]byte{}, perm[5:]...)
	f.started = string(vol) == "vol:started"
	f.pending = map[libtpms.StateType][]byte{}
	f.running = true
	return nil
}

func (f *fakeEngine) Terminate() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("Terminate")
	f.running, f.started = false, false
}

func fakeResp(rc uint32, params []byte) []byte {
	b := make([]byte, 10+len(params))
	binary.BigEndian.PutUint16(b, 0x8001)
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	binary.BigEndian.PutUint32(b[6:], rc)
	copy(b[10:], params)
	return b
}

func (f *fakeEngine) Process(cmd []byte) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.running {
		return nil, libtpms.ErrNotRunning
	}
	if len(cmd) < 10 || int(binary.BigEndian.Uint32(cmd[2:])) != len(cmd) {
		return fakeResp(0x142, nil), nil // TPM_RC_COMMAND_SIZE, as libtpms
	}
	cc := binary.BigEndian.Uint32(cmd[6:])
	params := cmd[10:]
	switch cc {
	case 0x144, 0x145, 0x17b:
		if len(params) < 2 {
			return fakeResp(0x09a, nil), nil // TPM_RC_INSUFFICIENT
		}
	}
	switch cc {
	case 0x144: // Startup
		f.record("Startup %d loc %d", binary.BigEndian.Uint16(params), f.locality)
		if f.started {
			return fakeResp(0x100, nil), nil
		}
		f.started = true
		return fakeResp(0, nil), nil
	}
	if !f.started {
		f.record("cc 0x%x before Startup", cc)
		return fakeResp(0x100, nil), nil
	}
	switch cc {
	case 0x145: // Shutdown
		su := binary.BigEndian.Uint16(params)
		f.record("Shutdown %d", su)
		if err := f.nv.Store("permall", append([]byte("perm:"), f.nvValue...)); err != nil {
			return nil, fmt.Errorf("fake: store permall: %w", err)
		}
		return fakeResp(0, nil), nil
	case 0x17b: // GetRandom
		n := binary.BigEndian.Uint16(params)
		f.record("GetRandom %d", n)
		out := make([]byte, 2+int(n))
		binary.BigEndian.PutUint16(out, n)
		for i := range out[2:] {
			out[2+i] = byte(i)
		}
		return fakeResp(0, out), nil
	case ccNVWrite:
		f.record("NV_Write %q", params)
		if err := f.nv.Store("permall", append([]byte("perm:"), params...)); err != nil {
			return nil, fmt.Errorf("fake: store permall: %w", err)
		}
		f.nvValue = append([]byte{}, params...)
		return fakeResp(0, nil), nil
	case ccNVRead:
		f.record("NV_Read")
		return fakeResp(0, f.nvValue), nil
	}
	f.record("cc 0x%x", cc)
	return fakeResp(0x143, nil), nil // TPM_RC_COMMAND_CODE
}

func (f *fakeEngine) SetLocality(loc uint8) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("SetLocality %d", loc)
	f.locality = loc
}

func (f *fakeEngine) VolatileAllStore() ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("VolatileAllStore")
	if !f.running {
		return nil, libtpms.ErrNotRunning
	}
	if f.started {
		return []byte("vol:started"), nil
	}
	return []byte("vol:"), nil
}

func (f *fakeEngine) SetBufferSize(want uint32) (uint32, uint32, uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("SetBufferSize %d", want)
	if want == 0 {
		return f.bufSize, 2808, 4096, nil
	}
	if f.running {
		return 0, 0, 0, libtpms.ErrRunning
	}
	f.bufSize = min(max(want, 2808), 4096)
	return f.bufSize, 2808, 4096, nil
}

func (f *fakeEngine) Info(flags uint64) (string, error) {
	f.record("Info %d", flags)
	return `{"TPMSpecification":{"family":"2.0","level":0,"revision":164}}`, nil
}

func (f *fakeEngine) check(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("%s", op)
	if !f.running {
		return libtpms.ErrNotRunning
	}
	return nil
}

func (f *fakeEngine) HashStart() error {
	if err := f.check("HashStart"); err != nil {
		return err
	}
	f.mu.Lock()
	f.hashing = true
	f.mu.Unlock()
	return nil
}

func (f *fakeEngine) HashData(p []byte) error {
	if err := f.check(fmt.Sprintf("HashData %d", len(p))); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.hashing {
		return libtpms.ResultFail
	}
	return nil
}

func (f *fakeEngine) HashEnd() error {
	if err := f.check("HashEnd"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.hashing {
		return libtpms.ResultFail
	}
	f.hashing, f.established = false, true
	return nil
}

func (f *fakeEngine) Established() (bool, error) {
	if err := f.check("Established"); err != nil {
		return false, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.established, nil
}

func (f *fakeEngine) ResetEstablished(loc uint8) error {
	if err := f.check(fmt.Sprintf("ResetEstablished %d", loc)); err != nil {
		return err
	}
	if loc < 3 {
		return fmt.Errorf("fake: %w", libtpms.ResultBadLocality)
	}
	f.mu.Lock()
	f.established = false
	f.mu.Unlock()
	return nil
}

func (f *fakeEngine) Cancel() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("Cancel")
	return nil
}

// memStore is an in-memory state store that can be told to fail.
type memStore struct {
	mu      sync.Mutex
	files   map[string][]byte
	failErr error // returned by Store when set
}

func newMemStore() *memStore { return &memStore{files: map[string][]byte{}} }

func (m *memStore) Load(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.files[name]
	if !ok {
		return nil, fmt.Errorf("memstore %s: %w", name, fs.ErrNotExist)
	}
	return append([]byte{}, b...), nil
}

func (m *memStore) Store(name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failErr != nil {
		return m.failErr
	}
	m.files[name] = append([]byte{}, data...)
	return nil
}

func (m *memStore) Delete(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.files, name)
	return nil
}

func (m *memStore) has(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.files[name]
	return ok
}

func (m *memStore) setFail(err error) {
	m.mu.Lock()
	m.failErr = err
	m.mu.Unlock()
}

// lockingStore is a memStore with a lock that can be released and taken again.
type lockingStore struct {
	*memStore
	released bool
}

func (l *lockingStore) LockStorage(ctx context.Context, retries int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.released = false
	return nil
}

func (l *lockingStore) ReleaseLock() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.released = true
	return nil
}
