package state

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"errors"
	"slices"
	"testing"
)

// fuzzKey is the key every fuzz target uses; its sealer is made once per target, not
// per input, so that the targets run at parser speed (the decoder itself derives no
// key: Dir derives it once at Open).
var fuzzKey = bytes.Repeat([]byte{9}, 32)

// fuzzDirID is the state ID the fuzzed directory has when the input asks for one.
var fuzzDirID = bytes.Repeat([]byte{0x5a}, stateIDSize)

// smallSlotFile returns a slotted file with tiny slots (the reader takes any even size;
// Store only writes whole pages), so that seeds stay small and mutations reach the
// header fields.
func smallSlotFile(t testing.TB, s *sealer, typ byte, id []byte, recs ...[]byte) []byte {
	const size = 160
	f := make([]byte, 2*size)
	for i, p := range recs {
		if p == nil {
			continue
		}
		rec, err := s.sealSlot(typ, uint64(7+i), size, id, 0, p)
		if err != nil {
			t.Fatal(err)
		}
		copy(f[i*size:], rec)
	}
	return f
}

// FuzzDecodeFile feeds arbitrary file contents to the state-file decoder under each blob
// name, with and without a key, a directory state ID and AcceptRollback. It must fail or
// succeed without panicking, and what it accepts must be consistent: a slotted result
// locates its record and, when bound, is bound to this directory; a keyed payload
// survives a seal/open round trip.
func FuzzDecodeFile(f *testing.F) {
	s, err := newSealer(fuzzKey)
	if err != nil {
		f.Fatal(err)
	}
	sealed, _ := s.seal(1, []byte("permanent state"))
	f.Add(sealed, uint8(0), true, false, false)
	f.Add([]byte("NKPSTATE"), uint8(1), true, false, false)
	f.Add(smallSlotFile(f, s, 1, fuzzDirID, []byte("one"), []byte("two")), uint8(0), true, true, false)
	f.Add(smallSlotFile(f, s, 2, fuzzDirID, nil, []byte("volatile")), uint8(1), true, true, true)
	f.Add([]byte("\x00\x03\xab\x36\x47\x23 bare permall"), uint8(0), false, false, false)
	f.Fuzz(func(t *testing.T, file []byte, nameSel uint8, keyed, hasID, acceptRollback bool) {
		o := decodeOpts{name: Names[int(nameSel)%len(Names)], acceptPlain: true, acceptRollback: acceptRollback}
		if keyed {
			o.seal, o.key = s, fuzzKey
		}
		if hasID {
			o.dirID = fuzzDirID
		}
		r, err := decode(file, o)
		if err != nil {
			if r.payload != nil {
				t.Fatalf("error %v with a payload", err)
			}
			return
		}
		if r.format == formatNKPSlots {
			if r.slots == nil || r.slots.size != len(file)/2 {
				t.Fatalf("slotted result without its slot: %+v", r.slots)
			}
			if r.stateID != nil && !bytes.Equal(r.stateID, o.dirID) {
				t.Fatalf("loaded a record bound to %x into directory %x", r.stateID, o.dirID)
			}
			for _, d := range r.damaged {
				if d.newer && !d.allowed {
					t.Fatalf("rolled back without leave: %+v", d)
				}
			}
		}
		if !keyed {
			return
		}
		typ := blobTypes[o.name]
		again, err := s.seal(typ, r.payload)
		if err != nil {
			t.Fatal(err)
		}
		back, err := s.open(typ, again)
		if err != nil || !bytes.Equal(back, r.payload) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// encryptHeaderless is swtpm's header-less encryption (swtpm_nvfile.c before the blob
// header: SWTPM_PrependHash, then TPM_SymmetricKeyData_Encrypt): AES-CBC with a zero IV
// over SHA-256(data) || data, padded to a multiple of the key length with bytes that
// hold the pad length. Written from swtpm's source independently of package envelope,
// so that the fixtures it builds check the decoder rather than mirror it.
func encryptHeaderless(key, data []byte) []byte {
	sum := sha256.Sum256(data)
	in := append(sum[:], data...)
	pad := len(key) - len(in)%len(key)
	in = append(in, bytes.Repeat([]byte{byte(pad)}, pad)...)
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	out := make([]byte, len(in))
	cipher.NewCBCEncrypter(block, make([]byte, aes.BlockSize)).CryptBlocks(out, in)
	return out
}

// FuzzDecodeLegacy feeds files without swtpm's blob header (swtpm before that header:
// bare libtpms blobs, and AES-CBC files under --key) to the decoder, with a 128- or
// 256-bit key or none. An accepted encrypted file must be exactly what swtpm's
// encryption of the payload gives (it is deterministic: zero IV); an accepted bare file
// is returned as it is and starts with libtpms' magic.
func FuzzDecodeLegacy(f *testing.F) {
	keys := map[uint8][]byte{1: fuzzKey[:16], 2: fuzzKey}
	f.Add(encryptHeaderless(fuzzKey[:16], []byte("\x00\x02\xab\x36\x47\x23 permall")), uint8(0), uint8(1))
	f.Add(encryptHeaderless(fuzzKey, []byte("\x00\x03\x45\x63\x78\x89 volatile")), uint8(1), uint8(2))
	f.Add([]byte("\x00\x03\x45\x63\x78\x89 volatile"), uint8(1), uint8(0))
	f.Add(bytes.Repeat([]byte{0x42}, 48), uint8(0), uint8(0))
	f.Fuzz(func(t *testing.T, file []byte, nameSel, keySel uint8) {
		o := decodeOpts{name: Names[int(nameSel)%2], key: keys[keySel%3], acceptPlain: true}
		r, err := decode(file, o)
		if err != nil {
			return
		}
		switch r.format {
		case formatBareKey:
			if want := encryptHeaderless(o.key, r.payload); !bytes.Equal(want, file) {
				t.Fatalf("accepted a header-less file that swtpm's encryption of its payload does not give")
			}
		case formatBare:
			if !bytes.Equal(r.payload, file) || !isLibtpmsBlob(file, blobTypes[o.name]) {
				t.Fatalf("bare blob changed or without libtpms' magic")
			}
		}
	})
}

// FuzzSlots mutates one byte of a two-record slotted file (both slots valid) at a
// fuzzed offset: the decoder either loads one of the two payloads or refuses, and it
// never loads the older one without reporting the damaged newer slot.
func FuzzSlots(f *testing.F) {
	s, err := newSealer(fuzzKey)
	if err != nil {
		f.Fatal(err)
	}
	base := smallSlotFile(f, s, 1, fuzzDirID, []byte("older record"), []byte("newer record"))
	f.Add(uint16(0), uint8(1))
	f.Add(uint16(160+70), uint8(0x80))
	f.Add(uint16(160+33), uint8(1))
	f.Fuzz(func(t *testing.T, off uint16, x uint8) {
		file := bytes.Clone(base)
		file[int(off)%len(file)] ^= x
		r, err := decode(file, decodeOpts{name: "permall", seal: s, key: fuzzKey, dirID: fuzzDirID})
		if err != nil {
			if x != 0 && !errors.Is(err, ErrRollback) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrAuth) && !errors.Is(err, ErrBlobType) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		switch string(r.payload) {
		case "newer record":
		case "older record":
			if len(r.damaged) == 0 {
				t.Fatalf("loaded the older record without reporting the newer slot")
			}
		default:
			t.Fatalf("loaded %q", r.payload)
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

// FuzzLinearLayout feeds arbitrary linear headers (for a file of size bytes) to the
// parser, and for each it accepts places n more bytes for an entry the way Store does:
// what the parser accepts re-encodes to the same entries; a placement never touches any
// entry's data (the one being replaced included), lies past the header, aligned, within
// the capacity; and the header after the store parses again, with the sections
// contiguous and the other entries' data where it was.
func FuzzLinearLayout(f *testing.F) {
	var empty layout
	f.Add(empty.encode(), uint32(linearHeaderSize), uint16(100), uint8(0))
	f.Add(make([]byte, linearHeaderSize), uint32(4096), uint16(3000), uint8(1))
	f.Fuzz(func(t *testing.T, hdr []byte, size uint32, n uint16, entry uint8) {
		lay, err := parseLayout(hdr, uint64(size))
		if err != nil {
			return
		}
		again, err := parseLayout(lay.encode(), uint64(size))
		if err != nil || again.entries != lay.entries {
			t.Fatalf("re-encoded header: %v, entries %+v, want %+v", err, again.entries, lay.entries)
		}
		i := int(entry) % 3
		capacity := uint64(size) + 64<<10
		at, err := lay.place(uint64(n), capacity)
		if err != nil {
			return
		}
		if at < linearHeaderSize || at%linearAlign != 0 || at+uint64(n) > capacity {
			t.Fatalf("placed %d bytes at %d (capacity %d)", n, at, capacity)
		}
		for _, s := range lay.spans(-1) {
			if at < s[1] && s[0] < at+uint64(n) {
				t.Fatalf("placed %d bytes at %d over live data %v", n, at, s)
			}
		}
		before := lay
		lay.set(i, at, uint64(n))
		end := max(uint64(size), at+uint64(n))
		after, err := parseLayout(lay.encode(), end)
		if err != nil {
			t.Fatalf("the header after the store does not parse: %v (%+v)", err, lay.entries)
		}
		var used []linearEntry
		for j, e := range after.entries {
			if j != i && (e.offset != before.entries[j].offset || e.dataLen != before.entries[j].dataLen) {
				t.Fatalf("entry %d moved: %+v, was %+v", j, e, before.entries[j])
			}
			if e.used() {
				used = append(used, e)
			}
		}
		slices.SortFunc(used, func(a, b linearEntry) int { return int(int64(a.offset) - int64(b.offset)) })
		for k, e := range used {
			next := e.offset + e.dataLen
			if k+1 < len(used) {
				next = used[k+1].offset
			}
			if e.sectionLen < e.dataLen || e.offset+e.sectionLen != next {
				t.Fatalf("sections not contiguous after the store: %+v", used)
			}
		}
	})
}
