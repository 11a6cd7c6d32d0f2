package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// swtpm's linear layout (backend-uri=file://, swtpm_nvstore_linear.h), byte for byte:
// one file or block device holding every state blob, little-endian:
//
//	0    u64 magic "swtpmlin" (0x737774706d6c696e)
//	8    u8  version (1)
//	9    u8  padding
//	10   u16 hdrsize (192)
//	12   15 × { u32 offset, u32 data_length, u32 section_length }
//	192  the sections
//
// Entry 0 is permall, 1 volatilestate, 2 savestate (swtpm's GetFileNr; the other twelve
// are never used by swtpm, but a reader keeps them as they are). An offset of 0 means
// the entry is unused. Each entry's data is what the directory backend would write to
// the blob's file: swtpm's blob envelope, plaintext or encrypted with --key. A section
// is the space from the entry's offset to the next entry's; swtpm places new sections at
// the end and, when it removes one, moves the following sections down by its length, so
// the sections must stay contiguous: layout.relink keeps them so.
const (
	linearMagic      uint64 = 0x737774706d6c696e
	linearVersion           = 1
	linearHeaderSize        = 192
	linearEntries           = 15
	// linearAlign aligns the data nkp places (a disk sector: a header write never shares a
	// sector with data, and data never starts mid-sector).
	linearAlign = 512
	// linearMaxOffset: offsets and lengths are u32.
	linearMaxOffset = 1<<32 - 1
)

// errNoLinearMagic: the first bytes are not a linear header (a new or foreign file).
var errNoLinearMagic = errors.New("no swtpm linear header (magic \"swtpmlin\")")

// linearEntry is one entry of the header's table.
type linearEntry struct {
	offset, dataLen, sectionLen uint32
}

func (e linearEntry) used() bool { return e.offset != 0 }

// end is where the entry's data ends.
func (e linearEntry) end() uint64 { return uint64(e.offset) + uint64(e.dataLen) }

// layout is a parsed linear header.
type layout struct {
	version uint8
	pad     uint8
	entries [linearEntries]linearEntry
}

// linearIndex returns the table index of blob name (swtpm's GetFileNr).
func linearIndex(name string) (int, bool) {
	t, ok := blobTypes[name]
	return int(t) - 1, ok
}

// parseLayout parses the header at the start of b, for a file or device of size bytes.
// It checks what swtpm's loader checks (magic, version, that each entry's data lies
// inside the file) and more: the header size is 192, every entry lies past the header,
// and no two entries' data overlap (each data range counts at least one byte, so two
// entries cannot share an offset). A header without the magic gives errNoLinearMagic.
func parseLayout(b []byte, size uint64) (layout, error) {
	var l layout
	if len(b) < linearHeaderSize {
		return l, fmt.Errorf("%w: %d bytes, shorter than the linear header (%d)", ErrCorrupt, len(b), linearHeaderSize)
	}
	if binary.LittleEndian.Uint64(b) != linearMagic {
		return l, errNoLinearMagic
	}
	l.version, l.pad = b[8], b[9]
	if l.version > linearVersion {
		return l, fmt.Errorf("%w: linear format version %d; swtpm 0.7.1 and nkp-swtpm read version %d", ErrCorrupt, l.version, linearVersion)
	}
	if hs := binary.LittleEndian.Uint16(b[10:]); hs != linearHeaderSize {
		return l, fmt.Errorf("%w: linear header size %d; want %d", ErrCorrupt, hs, linearHeaderSize)
	}
	for i := range l.entries {
		p := b[12+12*i:]
		e := linearEntry{binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint32(p[4:]), binary.LittleEndian.Uint32(p[8:])}
		if e.used() {
			switch {
			case e.offset < linearHeaderSize:
				return l, fmt.Errorf("%w: linear entry %d at offset %d, inside the header", ErrCorrupt, i, e.offset)
			case e.end() > size:
				return l, fmt.Errorf("%w: linear entry %d (offset %d, %d bytes) runs past the end (%d bytes)", ErrCorrupt, i, e.offset, e.dataLen, size)
			}
		}
		l.entries[i] = e
	}
	spans := l.spans(-1)
	for i := 1; i < len(spans); i++ {
		if spans[i][0] < spans[i-1][1] {
			return l, fmt.Errorf("%w: linear entries overlap at offset %d", ErrCorrupt, spans[i][0])
		}
	}
	return l, nil
}

// encode returns the 192-byte header.
func (l *layout) encode() []byte {
	b := make([]byte, linearHeaderSize)
	binary.LittleEndian.PutUint64(b, linearMagic)
	b[8] = linearVersion
	binary.LittleEndian.PutUint16(b[10:], linearHeaderSize)
	for i, e := range l.entries {
		p := b[12+12*i:]
		binary.LittleEndian.PutUint32(p, e.offset)
		binary.LittleEndian.PutUint32(p[4:], e.dataLen)
		binary.LittleEndian.PutUint32(p[8:], e.sectionLen)
	}
	return b
}

// spans returns the data ranges [start, end) of the used entries other than skip, by
// start; an empty entry spans one byte so that it keeps its offset to itself.
func (l *layout) spans(skip int) [][2]uint64 {
	var s [][2]uint64
	for i, e := range l.entries {
		if !e.used() || i == skip {
			continue
		}
		s = append(s, [2]uint64{uint64(e.offset), max(e.end(), uint64(e.offset)+1)})
	}
	slices.SortFunc(s, func(a, b [2]uint64) int { return int(int64(a[0]) - int64(b[0])) })
	return s
}

func alignUp(n uint64) uint64 { return (n + linearAlign - 1) &^ (linearAlign - 1) }

// place returns where n bytes of new data may go without touching the data of any
// entry, the current data of the entry being written included (it stays readable until
// the header points at the new copy): the first aligned gap that fits, or after the
// last entry. capacity bounds the file (a block device's size).
func (l *layout) place(n, capacity uint64) (uint64, error) {
	at := alignUp(linearHeaderSize)
	for _, s := range l.spans(-1) {
		if at+n <= s[0] {
			break
		}
		at = max(at, alignUp(s[1]))
	}
	if at+n > min(capacity, linearMaxOffset) {
		return 0, fmt.Errorf("no room for %d bytes: the data would end at %d, past the %d bytes available", n, at+n, min(capacity, linearMaxOffset))
	}
	return at, nil
}

// set points entry i at n bytes at offset (offset 0 clears it) and relinks the sections.
func (l *layout) set(i int, offset, n uint64) {
	l.entries[i] = linearEntry{offset: uint32(offset), dataLen: uint32(n)}
	if offset == 0 {
		l.entries[i].dataLen = 0
	}
	l.relink()
}

// relink sets each used entry's section length to the distance to the next entry's
// offset (the last one's to its data length), so that the sections are contiguous as
// swtpm expects when it moves sections down after removing one.
func (l *layout) relink() {
	var order []int
	for i, e := range l.entries {
		if e.used() {
			order = append(order, i)
		}
	}
	slices.SortFunc(order, func(a, b int) int { return int(int64(l.entries[a].offset) - int64(l.entries[b].offset)) })
	for k, i := range order {
		e := &l.entries[i]
		e.sectionLen = e.dataLen
		if k+1 < len(order) {
			e.sectionLen = l.entries[order[k+1]].offset - e.offset
		}
	}
}

// end returns where the last section ends (the header's end when there is none): what
// a regular file may be truncated to.
func (l *layout) end() uint64 {
	end := uint64(linearHeaderSize)
	for _, e := range l.entries {
		if e.used() {
			end = max(end, uint64(e.offset)+uint64(e.sectionLen), e.end())
		}
	}
	return end
}
