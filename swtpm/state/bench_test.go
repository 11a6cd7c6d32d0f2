package state

import (
	"bytes"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// BenchmarkStore measures one state write as libtpms makes it after each NV_Write: a
// permanent-state blob of swtpm's typical size (~1.7 KB) with new contents each time,
// with and without a key. Set TMPDIR to a disk-backed directory to include the real
// cost of fsync.
func BenchmarkStore(b *testing.B) {
	for _, tt := range []struct {
		name   string
		key    *Key
		noSync bool
	}{
		{"plaintext", nil, false},
		{"aes-256-gcm", testKey(b, 8, 32), false},
		{"aes-256-gcm-nosync", testKey(b, 8, 32), true},
	} {
		b.Run(tt.name, func(b *testing.B) {
			d := mustOpen(b, b.TempDir(), Options{Key: tt.key, NoSync: tt.noSync})
			blob := bytes.Repeat([]byte{0x5c}, 1700)
			b.SetBytes(int64(len(blob)))
			for i := 0; b.Loop(); i++ {
				blob[i%len(blob)]++ // new data every time, as after each NV_Write
				if err := d.Store("permall", blob); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkStoreUnchanged measures storing the payload the file holds already, as
// libtpms does with the permanent state at every start: nothing is written.
func BenchmarkStoreUnchanged(b *testing.B) {
	d := mustOpen(b, b.TempDir(), Options{Key: testKey(b, 8, 32)})
	blob := bytes.Repeat([]byte{0x5c}, 1700)
	if err := d.Store("permall", blob); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := d.Store("permall", blob); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoad measures reading the permanent state back (each INIT does).
func BenchmarkLoad(b *testing.B) {
	d := mustOpen(b, b.TempDir(), Options{Key: testKey(b, 8, 32)})
	if err := d.Store("permall", bytes.Repeat([]byte{0x5c}, 1700)); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := d.Load("permall"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeFuzzInputs measures the decoder on the kind of input the fuzz targets
// feed it (each seed with one byte changed, in turn), as inputs per second of one core:
// the fuzz engine's own overhead and the machine's load come on top.
func BenchmarkDecodeFuzzInputs(b *testing.B) {
	s, err := newSealer(fuzzKey)
	if err != nil {
		b.Fatal(err)
	}
	perm := bytes.Repeat([]byte{0x5c}, 1300)
	inputs := map[string][]byte{
		"slots":    smallSlotFile(b, s, 1, fuzzDirID, []byte("older record"), []byte("newer record")),
		"slots-1k": smallSlotFileN(b, s, 1300),
		"legacy":   encryptHeaderless(fuzzKey[:16], append([]byte("\x00\x02\xab\x36\x47\x23"), perm...)),
		"bare":     append([]byte("\x00\x02\xab\x36\x47\x23"), perm...),
		"garbage":  bytes.Repeat([]byte{0x42}, 64),
	}
	for name, in := range inputs {
		b.Run(name, func(b *testing.B) {
			o := decodeOpts{name: "permall", seal: s, key: fuzzKey, dirID: fuzzDirID, acceptPlain: true}
			f := bytes.Clone(in)
			cpu0 := cpuTime()
			for i := 0; b.Loop(); i++ {
				copy(f, in)
				f[i%len(f)] ^= byte(i)
				decode(f, o)
			}
			// CPU time rather than wall time: on a loaded machine the latter says more
			// about the neighbours than about the decoder.
			b.ReportMetric(float64(b.N)/(cpuTime()-cpu0).Seconds(), "inputs/cpu-s")
		})
	}
}

// smallSlotFileN is a slotted file whose record holds n payload bytes.
func smallSlotFileN(b *testing.B, s *sealer, n int) []byte {
	size := slotHeaderSize + n + 16
	rec, err := s.sealSlot(1, 1, size, fuzzDirID, 0, make([]byte, n))
	if err != nil {
		b.Fatal(err)
	}
	return newSlotFile(rec, size)
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkLinearStore is BenchmarkStore on a linear state file (backend-uri=file://):
// the blob in swtpm's format (AES-CBC + HMAC with a key), written beside the old one,
// fdatasync, then the header, fdatasync.
func BenchmarkLinearStore(b *testing.B) {
	for _, tt := range []struct {
		name   string
		key    *Key
		noSync bool
	}{
		{"plaintext", nil, false},
		{"aes-256-cbc", testKey(b, 8, 32), false},
		{"aes-256-cbc-nosync", testKey(b, 8, 32), true},
	} {
		b.Run(tt.name, func(b *testing.B) {
			l := mustOpenLinear(b, filepath.Join(b.TempDir(), "tpm.img"), Options{Key: tt.key, NoSync: tt.noSync})
			blob := bytes.Repeat([]byte{0x5c}, 1700)
			b.SetBytes(int64(len(blob)))
			for i := 0; b.Loop(); i++ {
				blob[i%len(blob)]++
				if err := l.Store("permall", blob); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
