//go:build cgo

package libtpms

import (
	"errors"
	"syscall"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// TestOffThread runs a TPM's start and commands with SetOffThread on and off: the
// results are the same (manufacture, Startup, GetRandom, an NV write stored before
// the reply, a failing store reported as an error), and with it on libtpms and the
// NVRAM callbacks run on another thread than the caller's.
func TestOffThread(t *testing.T) {
	for _, off := range []bool{false, true} {
		t.Run(map[bool]string{false: "on the caller's thread", true: "off thread"}[off], func(t *testing.T) {
			nv := newMemNVRAM()
			tpm := openTPM(t, nv)
			tpm.Lock()
			defer tpm.Unlock()
			tpm.SetOffThread(off)
			me := syscall.Gettid()
			if err := tpm.MainInit(); err != nil {
				t.Fatalf("MainInit: %v", err)
			}
			tids := nv.takeTids()
			if len(tids) == 0 {
				t.Fatal("MainInit made no NVRAM call")
			}
			for _, tid := range tids {
				if (tid != me) != off {
					t.Fatalf("MainInit's NVRAM call ran on thread %d, the caller is %d; off thread: %v", tid, me, off)
				}
			}
			if len(nv.blob("permall")) < 1000 {
				t.Fatalf("manufactured permall is %d bytes, want > 1000", len(nv.blob("permall")))
			}
			tr := tpmTransport{tpm}
			if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tr); err != nil {
				t.Fatalf("Startup: %v", err)
			}
			rsp, err := tpm2.GetRandom{BytesRequested: 32}.Execute(tr)
			if err != nil || len(rsp.RandomBytes.Buffer) != 32 {
				t.Fatalf("GetRandom(32): %v, %d bytes", err, len(rsp.RandomBytes.Buffer))
			}
			pub := defineNV(t, tpm, 8)
			nv.takeTids()
			if err := nvWrite(tpm, pub, []byte("stored!!")); err != nil {
				t.Fatal(err)
			}
			for _, tid := range nv.takeTids() {
				if (tid != me) != off {
					t.Fatalf("NV_Write's store ran on thread %d, the caller is %d; off thread: %v", tid, me, off)
				}
			}
			diskFull := errors.New("disk full")
			nv.mu.Lock()
			nv.failNext = diskFull
			nv.mu.Unlock()
			if err := nvWrite(tpm, pub, []byte("lost!!!!")); !errors.Is(err, diskFull) {
				t.Fatalf("NV_Write with a failing store: %v, want it to wrap %v", err, diskFull)
			}
			tpm.SetOffThread(false)
			if got, err := nvRead(tpm, pub.NVIndex, 8); err == nil || string(got) == "lost!!!!" {
				t.Fatalf("NV_Read after the failed store = %q, %v; want the TPM in failure mode", got, err)
			}
		})
	}
}
