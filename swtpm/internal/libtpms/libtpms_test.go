//go:build cgo

package libtpms

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"slices"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func TestManufactureOnEmptyNVRAM(t *testing.T) {
	nv := newMemNVRAM()
	tpm := openTPM(t, nv)
	if ops := nv.takeOps(); len(ops) != 0 {
		t.Fatalf("Open touched the NVRAM: %v", ops)
	}
	if err := tpm.MainInit(); err != nil {
		t.Fatalf("MainInit on empty NVRAM: %v", err)
	}
	ops := nv.takeOps()
	if !slices.Contains(ops, "load permall") || !slices.Contains(ops, "store permall") {
		t.Errorf("MainInit on empty NVRAM: ops %v, want a permall load (not found) and the manufactured permall stored", ops)
	}
	if !slices.Contains(ops, "load volatilestate") {
		t.Errorf("MainInit: ops %v, want volatilestate asked through the NVRAM", ops)
	}
	if len(nv.blob("permall")) < 1000 {
		t.Errorf("manufactured permall is %d bytes, want a real state (> 1000)", len(nv.blob("permall")))
	}
	// A manufactured TPM wants TPM2_Startup first.
	_, err := tpm2.GetRandom{BytesRequested: 8}.Execute(tpmTransport{tpm})
	if !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Errorf("GetRandom before Startup: %v, want TPM_RC_INITIALIZE", err)
	}
}

func TestStartupGetRandom(t *testing.T) {
	tpm := startTPM(t, newMemNVRAM())
	tests := []struct {
		ask  uint16
		want int
	}{
		{ask: 1, want: 1},
		{ask: 32, want: 32},
		{ask: 64, want: 64},
		{ask: 1000, want: 64}, // libtpms caps at the largest digest
	}
	for _, tc := range tests {
		rsp, err := tpm2.GetRandom{BytesRequested: tc.ask}.Execute(tpmTransport{tpm})
		if err != nil {
			t.Fatalf("GetRandom(%d): %v", tc.ask, err)
		}
		if got := len(rsp.RandomBytes.Buffer); got != tc.want {
			t.Errorf("GetRandom(%d) returned %d bytes, want %d", tc.ask, got, tc.want)
		}
		if tc.want >= 32 && bytes.Equal(rsp.RandomBytes.Buffer, make([]byte, tc.want)) {
			t.Errorf("GetRandom(%d) returned zeros", tc.ask)
		}
	}
}

// TestNVWriteStoredBeforeReply checks what the server's crash safety rests on:
// a command that changes NV stores permall before Process returns, and the
// stored permall alone brings the value back.
func TestNVWriteStoredBeforeReply(t *testing.T) {
	nv := newMemNVRAM()
	tpm := startTPM(t, nv)
	pub := defineNV(t, tpm, 64)
	writes := [][]byte{
		[]byte("first value"),
		bytes.Repeat([]byte{0xa5}, 64),
		[]byte("last value, the one that must survive"),
	}
	for _, data := range writes {
		nv.takeOps()
		if err := nvWrite(tpm, pub, data); err != nil {
			t.Fatalf("NV_Write %q: %v", data, err)
		}
		if ops := nv.takeOps(); countOps(ops, "store permall") != 1 {
			t.Errorf("NV_Write %q: NVRAM ops during Process %v, want exactly one permall store", data, ops)
		}
	}
	last := writes[len(writes)-1]

	// Restart from the NVRAM: the same TPM object, then a fresh one.
	tpm.Terminate()
	if err := nv.Delete("volatilestate"); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	if err := tpm.MainInit(); err != nil {
		t.Fatalf("MainInit from stored permall: %v", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpmTransport{tpm}); err != nil {
		t.Fatalf("Startup after restart: %v", err)
	}
	got, err := nvRead(tpm, pub.NVIndex, uint16(len(last)))
	if err != nil || !bytes.Equal(got, last) {
		t.Fatalf("NV after Terminate+MainInit = %q, %v; want %q", got, err, last)
	}
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	tpm2nd := startTPM(t, nv)
	got, err = nvRead(tpm2nd, pub.NVIndex, uint16(len(last)))
	if err != nil || !bytes.Equal(got, last) {
		t.Fatalf("NV in a newly opened TPM = %q, %v; want %q", got, err, last)
	}
}

// TestStateRoundTrip is the migration path: GetState on one TPM, SetState on
// a fresh one with an empty NVRAM, which resumes without TPM2_Startup.
func TestStateRoundTrip(t *testing.T) {
	src := startTPM(t, newMemNVRAM())
	digest := bytes.Repeat([]byte{0x42}, 32)
	if err := pcrExtend(src, 16, digest); err != nil {
		t.Fatalf("PCR_Extend: %v", err)
	}
	wantPCR, err := pcrRead(src, 16)
	if err != nil {
		t.Fatal(err)
	}
	pub := defineNV(t, src, 16)
	if err := nvWrite(src, pub, []byte("migrated")); err != nil {
		t.Fatal(err)
	}
	blobs := map[StateType][]byte{}
	for _, typ := range []StateType{Permanent, Volatile} {
		b, err := src.GetState(typ)
		if err != nil {
			t.Fatalf("GetState(%s): %v", typ, err)
		}
		blobs[typ] = b
	}
	if _, err := src.GetState(SaveState); !errors.Is(err, ErrNoState) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("GetState(savestate) = %v, want ErrNoState wrapping fs.ErrNotExist", err)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}

	nv := newMemNVRAM()
	dst := openTPM(t, nv)
	for _, typ := range []StateType{Permanent, Volatile} {
		if err := dst.SetState(typ, blobs[typ]); err != nil {
			t.Fatalf("SetState(%s): %v", typ, err)
		}
	}
	if err := dst.MainInit(); err != nil {
		t.Fatalf("MainInit with set state: %v", err)
	}
	if got := nv.blob("permall"); !bytes.Equal(got, blobs[Permanent]) {
		t.Errorf("MainInit stored a permall of %d bytes, want the %d bytes set", len(got), len(blobs[Permanent]))
	}
	gotPCR, err := pcrRead(dst, 16)
	if err != nil {
		t.Fatalf("PCR_Read on the restored TPM (no Startup): %v", err)
	}
	if !bytes.Equal(gotPCR, wantPCR) {
		t.Errorf("PCR16 after restore = %x, want %x", gotPCR, wantPCR)
	}
	gotNV, err := nvRead(dst, pub.NVIndex, 8)
	if err != nil || string(gotNV) != "migrated" {
		t.Errorf("NV after restore = %q, %v; want %q", gotNV, err, "migrated")
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpmTransport{dst}); !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Errorf("Startup on the restored TPM = %v, want TPM_RC_INITIALIZE (it already runs)", err)
	}
}

func TestSetBufferSize(t *testing.T) {
	tpm := openTPM(t, newMemNVRAM())
	tests := []struct {
		want, actual uint32
	}{
		{want: 0, actual: 4096}, // query; Open starts at the maximum
		{want: 1, actual: 2808},
		{want: 3968, actual: 3968}, // what QEMU's CRB asks
		{want: 0, actual: 3968},
		{want: 1 << 20, actual: 4096},
	}
	for _, tc := range tests {
		actual, lo, hi, err := tpm.SetBufferSize(tc.want)
		if err != nil {
			t.Fatalf("SetBufferSize(%d): %v", tc.want, err)
		}
		if actual != tc.actual || lo != 2808 || hi != 4096 {
			t.Errorf("SetBufferSize(%d) = %d [%d, %d], want %d [2808, 4096]", tc.want, actual, lo, hi, tc.actual)
		}
	}
	if err := tpm.MainInit(); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := tpm.SetBufferSize(3000); !errors.Is(err, ErrRunning) {
		t.Errorf("SetBufferSize(3000) on a running TPM: %v, want ErrRunning", err)
	}
	if actual, _, _, err := tpm.SetBufferSize(0); err != nil || actual != 4096 {
		t.Errorf("SetBufferSize(0) on a running TPM = %d, %v; want the query to work (4096)", actual, err)
	}
}

func TestInfo(t *testing.T) {
	tpm := openTPM(t, newMemNVRAM())
	tests := []struct {
		flags uint64
		keys  []string
	}{
		{flags: 1, keys: []string{"TPMSpecification"}},
		{flags: 2, keys: []string{"TPMAttributes"}},
		{flags: 1 | 2 | 4, keys: []string{"TPMSpecification", "TPMAttributes", "TPMFeatures"}},
		{flags: 0, keys: nil},
	}
	for _, tc := range tests {
		s, err := tpm.Info(tc.flags)
		if err != nil {
			t.Fatalf("Info(%d): %v", tc.flags, err)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			t.Fatalf("Info(%d) = %q: not JSON: %v", tc.flags, s, err)
		}
		if len(m) != len(tc.keys) {
			t.Errorf("Info(%d) = %s, want exactly keys %v", tc.flags, s, tc.keys)
		}
		for _, k := range tc.keys {
			if _, ok := m[k]; !ok {
				t.Errorf("Info(%d) = %s, missing %q", tc.flags, s, k)
			}
		}
	}
}

func TestSecondOpenFails(t *testing.T) {
	first := openTPM(t, newMemNVRAM())
	if _, err := Open(newMemNVRAM()); !errors.Is(err, ErrInUse) {
		t.Fatalf("second Open: %v, want ErrInUse", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := Open(newMemNVRAM())
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	again.Close()
	if _, err := first.Process(make([]byte, 10)); !errors.Is(err, ErrClosed) {
		t.Errorf("Process on a closed TPM: %v, want ErrClosed", err)
	}
}

// TestNothingInWorkingDirectory: without callbacks libtpms writes NVChip into
// the working directory; with them nothing may appear there.
func TestNothingInWorkingDirectory(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	nv := newMemNVRAM()
	tpm := startTPM(t, nv)
	pub := defineNV(t, tpm, 8)
	if err := nvWrite(tpm, pub, []byte("12345678")); err != nil {
		t.Fatal(err)
	}
	if _, err := tpm.GetState(Permanent); err != nil {
		t.Fatal(err)
	}
	tpm.Terminate()
	if err := tpm.MainInit(); err != nil {
		t.Fatal(err)
	}
	tpm.Close()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("working directory holds %v after a TPM lifecycle, want nothing", entries)
	}
}

// TestStoreFailure: an NVRAM that cannot store makes Process fail, libtpms
// enters failure mode, and a restart comes back with the last stored state.
func TestStoreFailure(t *testing.T) {
	diskFull := errors.New("disk full")
	tests := []struct {
		name  string
		store func(m *memNVRAM)
		want  error
	}{
		{name: "error", store: func(m *memNVRAM) { m.failNext = diskFull }, want: diskFull},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nv := newMemNVRAM()
			tpm := startTPM(t, nv)
			pub := defineNV(t, tpm, 8)
			if err := nvWrite(tpm, pub, []byte("stored!!")); err != nil {
				t.Fatal(err)
			}
			tc.store(nv)
			err := nvWrite(tpm, pub, []byte("lost!!!!"))
			if !errors.Is(err, tc.want) {
				t.Fatalf("NV_Write with a failing store: %v, want it to wrap %v", err, tc.want)
			}
			if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpmTransport{tpm}); !errors.Is(err, tpm2.TPMRCFailure) {
				t.Errorf("command after the failed store: %v, want TPM_RC_FAILURE", err)
			}
			tpm.Terminate()
			if err := nv.Delete("volatilestate"); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Fatal(err)
			}
			if err := tpm.MainInit(); err != nil {
				t.Fatalf("MainInit after failure mode: %v", err)
			}
			if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpmTransport{tpm}); err != nil {
				t.Fatal(err)
			}
			got, err := nvRead(tpm, pub.NVIndex, 8)
			if err != nil || string(got) != "stored!!" {
				t.Errorf("NV after restart = %q, %v; want the last stored %q", got, err, "stored!!")
			}
		})
	}
}

// panicNVRAM panics on Store, as a buggy implementation might.
type panicNVRAM struct{ *memNVRAM }

func (p panicNVRAM) Store(name string, data []byte) error {
	if name == "permall" && len(p.memNVRAM.blob("permall")) > 0 {
		panic("store bug")
	}
	return p.memNVRAM.Store(name, data)
}

func TestCallbackPanicIsAnError(t *testing.T) {
	tpm := openTPM(t, panicNVRAM{newMemNVRAM()})
	if err := tpm.MainInit(); err != nil {
		t.Fatal(err)
	}
	_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(tpmTransport{tpm})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("panicked")) {
		t.Errorf("Startup with a panicking Store: %v, want an error naming the panic", err)
	}
}

// errAnyResult, as a wanted error, accepts any error carrying a libtpms Result.
var errAnyResult = errors.New("any libtpms result")

func isErr(err, want error) bool {
	if want == errAnyResult {
		var r Result
		return errors.As(err, &r) && r != ResultSuccess
	}
	return errors.Is(err, want)
}

func TestStateMisuse(t *testing.T) {
	garbage := bytes.Repeat([]byte{0x5a}, 2000)
	tests := []struct {
		name string
		run  func(t *testing.T, nv *memNVRAM, tpm *TPM) error
		want error
	}{
		{"Process before MainInit", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			_, err := tpm.Process([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0})
			return err
		}, ErrNotRunning},
		{"SetState while running", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			if err := tpm.MainInit(); err != nil {
				t.Fatal(err)
			}
			return tpm.SetState(Permanent, garbage)
		}, ErrRunning},
		{"MainInit twice", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			if err := tpm.MainInit(); err != nil {
				t.Fatal(err)
			}
			return tpm.MainInit()
		}, ErrRunning},
		{"unknown state type", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			return tpm.SetState(7, garbage)
		}, ResultBadParameter},
		{"garbage permanent blob", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			return tpm.SetState(Permanent, garbage)
		}, errAnyResult},
		{"oversized blob", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			return tpm.SetState(Permanent, make([]byte, MaxBlobSize+1))
		}, ResultSize},
		{"established before MainInit", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			_, err := tpm.Established()
			return err
		}, ResultBadOrdinal},
		{"oversized command", func(t *testing.T, nv *memNVRAM, tpm *TPM) error {
			if err := tpm.MainInit(); err != nil {
				t.Fatal(err)
			}
			_, err := tpm.Process(make([]byte, maxCommand+1))
			return err
		}, ResultSize},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nv := newMemNVRAM()
			tpm := openTPM(t, nv)
			err := tc.run(t, nv, tpm)
			if !isErr(err, tc.want) {
				t.Fatalf("%s: %v, want %v", tc.name, err, tc.want)
			}
		})
	}
}

// TestCorruptPermall: a corrupt permall in the NVRAM is a clear MainInit
// error, and nothing is written over it.
func TestCorruptPermall(t *testing.T) {
	tests := []struct {
		name string
		blob []byte
	}{
		{"garbage", bytes.Repeat([]byte{0xff}, 3000)},
		{"one byte", []byte{1}},
		{"empty", []byte{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nv := newMemNVRAM()
			nv.blobs["permall"] = bytes.Clone(tc.blob)
			tpm := openTPM(t, nv)
			err := tpm.MainInit()
			if err == nil {
				t.Fatalf("MainInit on a %s permall succeeded, want an error", tc.name)
			}
			if ops := nv.takeOps(); slices.Contains(ops, "store permall") {
				t.Errorf("MainInit on a corrupt permall stored over it: %v", ops)
			}
			if !bytes.Equal(nv.blob("permall"), tc.blob) {
				t.Errorf("corrupt permall was changed")
			}
			if _, err := tpm.Process(make([]byte, 10)); !errors.Is(err, ErrNotRunning) {
				t.Errorf("Process after failed MainInit: %v, want ErrNotRunning", err)
			}
		})
	}
}

func TestEstablished(t *testing.T) {
	tpm := startTPM(t, newMemNVRAM())
	tpm.SetLocality(0)
	steps := []struct {
		name    string
		do      func() error
		wantErr error
		want    bool
	}{
		{"initially", func() error { return nil }, nil, false},
		{"hash sequence", func() error {
			if err := tpm.HashStart(); err != nil {
				return err
			}
			if err := tpm.HashData([]byte("measured firmware")); err != nil {
				return err
			}
			return tpm.HashEnd()
		}, nil, true},
		{"reset from locality 0", func() error { return tpm.ResetEstablished(0) }, ResultBadLocality, true},
		{"reset from locality 3", func() error { return tpm.ResetEstablished(3) }, nil, false},
	}
	for _, s := range steps {
		if err := s.do(); !errors.Is(err, s.wantErr) {
			t.Fatalf("%s: %v, want %v", s.name, err, s.wantErr)
		}
		got, err := tpm.Established()
		if err != nil || got != s.want {
			t.Errorf("%s: Established = %v, %v; want %v", s.name, got, err, s.want)
		}
	}
	// ResetEstablished must not leave its locality behind: PCR 20 is not
	// extendable from locality 0, whatever locality the reset used.
	if err := pcrExtend(tpm, 20, make([]byte, 32)); !errors.Is(err, tpm2.TPMRCLocality) {
		t.Errorf("PCR 20 extend at locality 0 after ResetEstablished(3): %v, want TPM_RC_LOCALITY", err)
	}
}

func TestLocality(t *testing.T) {
	tpm := startTPM(t, newMemNVRAM())
	tests := []struct {
		loc  uint8
		pcr  uint
		want error
	}{
		{loc: 0, pcr: 16, want: nil},
		{loc: 0, pcr: 20, want: tpm2.TPMRCLocality},
		{loc: 2, pcr: 20, want: nil},
		{loc: 0, pcr: 17, want: tpm2.TPMRCLocality},
		{loc: 4, pcr: 17, want: nil},
	}
	for _, tc := range tests {
		tpm.SetLocality(tc.loc)
		err := pcrExtend(tpm, tc.pcr, bytes.Repeat([]byte{1}, 32))
		if (tc.want == nil && err != nil) || (tc.want != nil && !errors.Is(err, tc.want)) {
			t.Errorf("PCR %d extend at locality %d: %v, want %v", tc.pcr, tc.loc, err, tc.want)
		}
	}
}

func TestVolatileThroughNVRAM(t *testing.T) {
	nv := newMemNVRAM()
	tpm := startTPM(t, nv)
	if err := pcrExtend(tpm, 16, bytes.Repeat([]byte{7}, 32)); err != nil {
		t.Fatal(err)
	}
	want, err := pcrRead(tpm, 16)
	if err != nil {
		t.Fatal(err)
	}
	vol, err := tpm.VolatileAllStore()
	if err != nil {
		t.Fatalf("VolatileAllStore: %v", err)
	}
	if err := nv.Store("volatilestate", vol); err != nil {
		t.Fatal(err)
	}
	tpm.Terminate()
	nv.takeOps()
	if err := tpm.MainInit(); err != nil {
		t.Fatalf("MainInit with volatilestate in the NVRAM: %v", err)
	}
	if ops := nv.takeOps(); !slices.Contains(ops, "load volatilestate") {
		t.Errorf("MainInit ops %v, want volatilestate loaded through the NVRAM", ops)
	}
	got, err := pcrRead(tpm, 16)
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("PCR16 after MainInit from volatilestate = %x, %v; want %x without Startup", got, err, want)
	}
}

func TestCancel(t *testing.T) {
	tpm := startTPM(t, newMemNVRAM())
	if err := tpm.Cancel(); err != nil {
		t.Fatalf("Cancel on an open TPM: %v", err)
	}
	// A cancel request is dropped when the next command starts, as in swtpm.
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpmTransport{tpm}); err != nil {
		t.Errorf("GetRandom after Cancel: %v", err)
	}
	tpm.Close()
	if err := tpm.Cancel(); !errors.Is(err, ErrClosed) {
		t.Errorf("Cancel after Close: %v, want ErrClosed", err)
	}
}

func TestStateTypeNames(t *testing.T) {
	tests := []struct {
		typ  StateType
		name string
	}{
		{Permanent, "permall"},
		{Volatile, "volatilestate"},
		{SaveState, "savestate"},
		{0, ""},
		{4, ""},
	}
	for _, tc := range tests {
		if got := tc.typ.Name(); got != tc.name {
			t.Errorf("StateType(%d).Name() = %q, want %q", tc.typ, got, tc.name)
		}
	}
	if s := StateType(9).String(); s != "StateType(9)" {
		t.Errorf("String of an unknown type = %q", s)
	}
}
