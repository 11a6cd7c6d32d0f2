package state

import (
	"bytes"
	"testing"
)

// FuzzDecodeFile feeds arbitrary file contents to the state-file decoder under each blob
// name and key choice: it must fail or succeed without panicking, and whatever it
// accepts with a key must survive a seal/open round trip.
func FuzzDecodeFile(f *testing.F) {
	key := bytes.Repeat([]byte{9}, 32)
	s, err := newSealer(key)
	if err != nil {
		f.Fatal(err)
	}
	sealed, _ := s.seal(1, []byte("permanent state"))
	f.Add(sealed, uint8(0), true)
	f.Add([]byte("NKPSTATE"), uint8(1), true)
	rec, _ := s.sealSlot(1, 7, slotSizeFor(15), []byte("permanent state"))
	f.Add(newSlotFile(rec, slotSizeFor(15)), uint8(0), true)
	f.Fuzz(func(t *testing.T, file []byte, nameSel uint8, keyed bool) {
		name := Names[int(nameSel)%len(Names)]
		var sl *sealer
		var k []byte
		if keyed {
			sl, k = s, key
		}
		p, _, err := decodeFile(name, file, sl, k, true)
		if err != nil || !keyed {
			return
		}
		again, err := s.seal(blobTypes[name], p)
		if err != nil {
			t.Fatal(err)
		}
		back, err := s.open(blobTypes[name], again)
		if err != nil || !bytes.Equal(back, p) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// FuzzDecodeKey feeds arbitrary key-file contents to the key parser (both formats): no
// panic, and an accepted key is 16 or 32 bytes that re-encodes to the same key.
func FuzzDecodeKey(f *testing.F) {
	f.Add([]byte("0x00112233445566778899aabbccddeeff\n"), false)
	f.Add(bytes.Repeat([]byte("ab"), 32), false)
	f.Add(bytes.Repeat([]byte{7}, 32), true)
	f.Fuzz(func(t *testing.T, raw []byte, binary bool) {
		format := "hex"
		if binary {
			format = "binary"
		}
		k, err := decodeKey(raw, format)
		if err != nil {
			return
		}
		if len(k) != 16 && len(k) != 32 {
			t.Fatalf("accepted a %d-byte key", len(k))
		}
		if binary && !bytes.Equal(k, raw) {
			t.Fatalf("binary key changed")
		}
	})
}
