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
