package state

import (
	"bytes"
	"testing"
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
