package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-tpm/tpm2/transport/simulator"

	"github.com/nkp-dev/nkp/test/guest"
)

// TestAgentAgainstSimulator runs the agent's steps, in order, against one TPM simulator
// (one per process), the way successive boots of the guest use one vTPM state.
func TestAgentAgainstSimulator(t *testing.T) {
	tpm, err := simulator.OpenSimulator()
	if err != nil {
		t.Skipf("TPM simulator unavailable (needs cgo): %v", err)
	}
	defer tpm.Close()

	pcr16 := func(data string) string {
		// PCR16 starts at zero in the simulator: extend = sha256(zero || sha256(data)).
		d := sha256.Sum256([]byte(data))
		v := sha256.Sum256(append(make([]byte, 32), d[:]...))
		return hex.EncodeToString(v[:])
	}
	disks := fileDisks(t, "vda", "vdb")
	steps := []struct {
		name    string
		cfg     guest.Config
		wantErr string            // substring of the error; "" means success
		want    map[string]string // key -> value expected in the last record with that key
		loops   int               // records with key "loop"
	}{
		{name: "info only", want: map[string]string{"tpm": "2.0", "tpm-manufacturer": "MSFT"}},
		{name: "read before any write", cfg: guest.Config{Actions: []string{guest.ActionNVRead}}, wantErr: "not defined"},
		{name: "first write defines", cfg: guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "first"},
			want: map[string]string{"nvdefine": "ok", "nvwrite": "ok", "nv": "first"}},
		{name: "second write overwrites, shorter", cfg: guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "2nd"},
			want: map[string]string{"nvwrite": "ok", "nv": "2nd"}},
		{name: "read", cfg: guest.Config{Actions: []string{guest.ActionNVRead}}, want: map[string]string{"nv": "2nd"}},
		{name: "extend then loop", cfg: guest.Config{Actions: []string{guest.ActionExtend, guest.ActionLoop}, Extend: "hello", Loop: 3},
			want: map[string]string{"pcr16": pcr16("hello"), "nv": "2nd"}, loops: 3},
		{name: "disk write on two devices", cfg: guest.Config{Actions: []string{guest.ActionDiskWrite}, Disk: "m-1", Devices: []string{"vda", "vdb"}},
			want: map[string]string{"diskwrite": "vdb", "disk-vda": "m-1", "disk-vdb": "m-1"}},
		{name: "loop reads the disk", cfg: guest.Config{Actions: []string{guest.ActionDiskRead, guest.ActionLoop}, Loop: 2},
			want: map[string]string{"diskread": "vda", "disk-vda": "m-1", "nv": "2nd"}, loops: 2},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			var out bytes.Buffer
			slept := 0
			a := &agent{out: &out, tpm: tpm, sleep: func(time.Duration) { slept++ }, openDisk: disks}
			err := a.run(st.cfg)
			if st.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), st.wantErr) {
					t.Fatalf("run: err %v, want one containing %q", err, st.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("run: %v\noutput:\n%s", err, out.String())
			}
			recs := guest.ParseConsole(out.Bytes())
			if v, _ := guest.Last(recs, "pcr0"); len(v) != 64 {
				t.Errorf("pcr0 = %q, want 64 hex digits", v)
			}
			for k, want := range st.want {
				if got, _ := guest.Last(recs, k); got != want {
					t.Errorf("%s = %q, want %q\noutput:\n%s", k, got, want, out.String())
				}
			}
			n := 0
			for _, r := range recs {
				if _, ok := r["loop"]; ok {
					n++
				}
			}
			if n != st.loops || slept != st.loops {
				t.Errorf("loop records %d and sleeps %d, want %d each", n, slept, st.loops)
			}
		})
	}
}

func TestFourCC(t *testing.T) {
	tests := []struct {
		v    uint32
		want string
	}{
		{0x322e3000, "2.0"},
		{0x49424d00, "IBM"},
		{0x494e5443, "INTC"},
		{0x414d4420, "AMD"},
		{0, ""},
	}
	for _, tc := range tests {
		if got := fourCC(tc.v); got != tc.want {
			t.Errorf("fourCC(%#x) = %q, want %q", tc.v, got, tc.want)
		}
	}
}

// fileDisks makes a 2 MiB file per device name and returns an openDisk over them.
func fileDisks(t *testing.T, devs ...string) func(string) (*os.File, error) {
	t.Helper()
	dir := t.TempDir()
	for _, d := range devs {
		if err := os.WriteFile(filepath.Join(dir, d), make([]byte, 2<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return func(dev string) (*os.File, error) {
		return os.OpenFile(filepath.Join(dir, dev), os.O_RDWR, 0)
	}
}

// TestDiskActions runs the disk actions against files: what diskwrite writes, diskread
// and a raw read of the file find at DiskOffset; a blank or overwritten disk fails with
// the device named.
func TestDiskActions(t *testing.T) {
	open := fileDisks(t, "vda", "vdb", "vdc")
	var out bytes.Buffer
	a := &agent{out: &out, openDisk: open}
	if err := a.diskWrite("vda", "marker-A"); err != nil {
		t.Fatal(err)
	}
	if err := a.diskWrite("vdb", "marker-B"); err != nil {
		t.Fatal(err)
	}
	// Garbage over vdc's block: not a marker.
	f, _ := open("vdc")
	f.WriteAt(bytes.Repeat([]byte{0xa5}, guest.DiskBlockSize), guest.DiskOffset)
	f.Close()
	tests := []struct {
		dev, want, wantErr string
	}{
		{dev: "vda", want: "marker-A"},
		{dev: "vdb", want: "marker-B"},
		{dev: "vdc", wantErr: "vdc holds no marker at offset 1048576"},
		{dev: "vdd", wantErr: "no such file"},
	}
	for _, tc := range tests {
		got, err := a.diskRead(tc.dev)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("diskRead(%s) = %q, %v; want an error containing %q", tc.dev, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("diskRead(%s) = %q, %v; want %q", tc.dev, got, err, tc.want)
		}
	}
	// The block is where the host looks for it, byte for byte.
	f, _ = open("vda")
	raw := make([]byte, guest.DiskBlockSize)
	f.ReadAt(raw, guest.DiskOffset)
	f.Close()
	if !bytes.Equal(raw, guest.DiskBlock("marker-A")) {
		t.Errorf("vda at DiskOffset holds %q..., want DiskBlock(marker-A)", raw[:40])
	}
	recs := guest.ParseConsole(out.Bytes())
	if v, _ := guest.Last(recs, "disk-vdb"); v != "marker-B" {
		t.Errorf("printed disk-vdb=%q, want marker-B:\n%s", v, out.String())
	}
}

func TestDiskBlockAligned(t *testing.T) {
	for range 8 {
		b := diskBlock()
		if len(b) != guest.DiskBlockSize || uintptr(unsafe.Pointer(&b[0]))%4096 != 0 {
			t.Fatalf("diskBlock: len %d at %p, want %d bytes on a 4 KiB boundary", len(b), &b[0], guest.DiskBlockSize)
		}
	}
}

// TestEKAndEventLog: the EK line is the same on every run against one TPM (it depends on
// the endorsement seed only), and the event log line says absent, or what is wrong with
// a log that is not a TCG2 log.
func TestEKAndEventLog(t *testing.T) {
	tpm, err := simulator.OpenSimulator()
	if err != nil {
		t.Skipf("TPM simulator unavailable (needs cgo): %v", err)
	}
	defer tpm.Close()
	garbage := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(garbage, []byte("not a log"), 0o600); err != nil {
		t.Fatal(err)
	}
	var eks []string
	for _, tc := range []struct {
		log, key, want string
	}{
		{filepath.Join(t.TempDir(), "absent"), "eventlog", "absent"},
		{garbage, "eventlog-error", "event log: first event: truncated: 20 bytes wanted, 1 left"},
	} {
		var out bytes.Buffer
		a := &agent{out: &out, tpm: tpm, eventLog: tc.log, sleep: func(time.Duration) {}}
		if err := a.run(guest.Config{Actions: []string{guest.ActionEK}}); err != nil {
			t.Fatalf("run: %v\n%s", err, out.String())
		}
		recs := guest.ParseConsole(out.Bytes())
		if got, _ := guest.Last(recs, tc.key); got != tc.want {
			t.Errorf("%s = %q, want %q\n%s", tc.key, got, tc.want, out.String())
		}
		ek, _ := guest.Last(recs, "ek")
		if len(ek) != 64 {
			t.Errorf("ek = %q, want 64 hex digits", ek)
		}
		if certs, _ := guest.Last(recs, "ek-certs"); certs != "none" {
			t.Errorf("ek-certs = %q, want none (the simulator has no EK certificate)", certs)
		}
		eks = append(eks, ek)
	}
	if eks[0] != eks[1] {
		t.Errorf("the EK changed between two runs on one TPM: %s, then %s", eks[0], eks[1])
	}
}

// TestEFILine: efi=yes when the EFI sysfs directory exists, efi=no when it does not.
func TestEFILine(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ efi, want string }{
		{dir, "yes"},
		{filepath.Join(dir, "none"), "no"},
	} {
		var out bytes.Buffer
		(&agent{out: &out, efi: tc.efi}).printEFI()
		if got, _ := guest.Last(guest.ParseConsole(out.Bytes()), "efi"); got != tc.want {
			t.Errorf("%s: efi = %q, want %q", tc.efi, got, tc.want)
		}
	}
}
