package envelope

import (
	"bytes"
	"testing"
)

// fuzzKeys are the keys the fuzz targets pick from; index 0 is "no key".
var fuzzKeys = [][]byte{nil, bytes.Repeat([]byte{1}, 16), bytes.Repeat([]byte{2}, 32)}

// FuzzDecodeFile feeds arbitrary bytes to the state-file decoder: it must return an
// error or a payload, never panic, and a payload it accepts must re-encode to a blob
// that decodes to the same payload.
func FuzzDecodeFile(f *testing.F) {
	f.Add([]byte{}, uint8(0))
	for _, k := range fuzzKeys {
		b, _ := EncodeFile([]byte("tpm state"), k)
		f.Add(b, uint8(len(k)/16))
	}
	f.Fuzz(func(t *testing.T, blob []byte, keySel uint8) {
		key := fuzzKeys[int(keySel)%len(fuzzKeys)]
		data, err := DecodeFile(blob, key)
		if err != nil {
			return
		}
		again, err := EncodeFile(data, key)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		back, err := DecodeFile(again, key)
		if err != nil || !bytes.Equal(back, data) {
			t.Fatalf("round trip of an accepted payload failed: %v", err)
		}
	})
}

// FuzzFromMigration feeds arbitrary SET_STATEBLOB payloads and request flags to the
// migration decoder with each combination of keys: no panic, and an accepted payload
// survives ForMigration/FromMigration with the same keys.
func FuzzFromMigration(f *testing.F) {
	f.Add([]byte{}, uint32(0), uint8(0))
	for i, m := range fuzzKeys {
		for j, s := range fuzzKeys {
			b, flags, _ := ForMigrationWithStateKey([]byte("libtpms blob"), m, s, false)
			f.Add(b, flags, uint8(i*3+j))
		}
	}
	f.Fuzz(func(t *testing.T, blob []byte, reqFlags uint32, keySel uint8) {
		mig := fuzzKeys[int(keySel)%3]
		state := fuzzKeys[int(keySel/3)%3]
		data, err := FromMigration(blob, reqFlags, mig, state)
		if err != nil || data == nil {
			return
		}
		again, flags, err := ForMigrationWithStateKey(data, mig, state, false)
		if err != nil {
			t.Fatalf("re-wrap: %v", err)
		}
		back, err := FromMigration(again, flags, mig, state)
		if err != nil || !bytes.Equal(back, data) {
			t.Fatalf("round trip of an accepted payload failed: %v", err)
		}
	})
}
