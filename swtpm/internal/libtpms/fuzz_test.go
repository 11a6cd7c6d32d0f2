//go:build cgo

package libtpms

import (
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// FuzzSetState feeds untrusted bytes (an incoming migration blob, a state
// file) to libtpms' unmarshalling through SetState and, when libtpms accepts
// them, starts the TPM and runs a command. Whatever the bytes, the process
// must not crash and a refusal must be an error carrying a libtpms Result.
func FuzzSetState(f *testing.F) {
	f.Add(uint8(Permanent), []byte{})
	f.Add(uint8(Permanent), []byte{0xab, 0x36, 0x47, 0x23, 0, 0, 0, 1})
	f.Add(uint8(Volatile), []byte("not a volatile state"))
	f.Add(uint8(SaveState), []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, typ uint8, blob []byte) {
		tpm, err := Open(newMemNVRAM())
		if err != nil {
			t.Fatal(err)
		}
		defer tpm.Close()
		if err := tpm.SetState(StateType(typ), blob); err != nil {
			var r Result
			if !errors.As(err, &r) {
				t.Fatalf("SetState refusal without a Result: %v", err)
			}
			return
		}
		if err := tpm.MainInit(); err != nil {
			return
		}
		_, _ = tpm2.GetRandom{BytesRequested: 8}.Execute(tpmTransport{tpm})
		if _, err := tpm.GetState(Permanent); err != nil {
			t.Fatalf("GetState(permanent) on a TPM started from fuzzed state: %v", err)
		}
	})
}
