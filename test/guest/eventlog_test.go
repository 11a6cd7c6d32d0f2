package guest

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"
)

// logBuilder writes a crypto-agile event log with SHA-1 and SHA-256 banks.
type logBuilder struct{ bytes.Buffer }

func (b *logBuilder) u32(v uint32) { binary.Write(&b.Buffer, binary.LittleEndian, v) }
func (b *logBuilder) u16(v uint16) { binary.Write(&b.Buffer, binary.LittleEndian, v) }

func newLog() *logBuilder {
	b := &logBuilder{}
	var spec logBuilder
	spec.WriteString(specIDSignature)
	spec.u32(0)                 // platform class
	spec.Write([]byte{0, 2, 0}) // versions
	spec.WriteByte(2)           // uintn size
	spec.u32(2)
	spec.u16(0x0004) // SHA-1
	spec.u16(20)
	spec.u16(algSHA256)
	spec.u16(32)
	spec.WriteByte(0) // vendor info size
	b.u32(0)
	b.u32(evNoAction)
	b.Write(make([]byte, 20))
	b.u32(uint32(spec.Len()))
	b.Write(spec.Bytes())
	return b
}

// event appends an event measuring data into pcr (both banks).
func (b *logBuilder) event(pcr, typ uint32, data []byte) {
	s1, s256 := sha1.Sum(data), sha256.Sum256(data)
	b.u32(pcr)
	b.u32(typ)
	b.u32(2)
	b.u16(0x0004)
	b.Write(s1[:])
	b.u16(algSHA256)
	b.Write(s256[:])
	b.u32(uint32(len(data)))
	b.Write(data)
}

func extend(acc []byte, data string) []byte {
	d := sha256.Sum256([]byte(data))
	h := sha256.Sum256(append(append([]byte{}, acc...), d[:]...))
	return h[:]
}

func TestReplaySHA256(t *testing.T) {
	b := newLog()
	b.event(0, evNoAction, append([]byte(startupLocalitySg), 3))
	b.event(0, 0x80000008, []byte("firmware volume"))
	b.event(7, 0x800000e0, []byte("secure boot"))
	b.event(0, 0x4, []byte("separator"))
	log := b.Bytes()

	start := make([]byte, 32)
	start[31] = 3
	want0 := extend(extend(start, "firmware volume"), "separator")
	want7 := extend(make([]byte, 32), "secure boot")
	for _, tc := range []struct {
		pcr  uint32
		want []byte
	}{{0, want0}, {7, want7}, {4, make([]byte, 32)}} {
		got, n, err := ReplaySHA256(log, tc.pcr)
		if err != nil {
			t.Fatalf("PCR %d: %v", tc.pcr, err)
		}
		if !bytes.Equal(got, tc.want) || n != 5 {
			t.Errorf("PCR %d: %x after %d events, want %x after 5", tc.pcr, got, n, tc.want)
		}
	}

	sha1Only := &logBuilder{}
	sha1Only.u32(0)
	sha1Only.u32(0x8)
	sha1Only.Write(make([]byte, 20))
	sha1Only.u32(0)
	bad := []struct {
		name, want string
		log        []byte
	}{
		{"empty", "truncated", nil},
		{"SHA-1 log", "Spec ID", sha1Only.Bytes()},
		{"truncated event", "event 5: truncated", log[:len(log)-3]},
		{"truncated digest", "truncated", log[:len(log)-20-4-len("separator")]},
	}
	for _, tc := range bad {
		if _, _, err := ReplaySHA256(tc.log, 0); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// FuzzReplaySHA256 feeds arbitrary bytes to the replay: it must not panic, and a
// successful replay gives a 32-byte value.
func FuzzReplaySHA256(f *testing.F) {
	b := newLog()
	b.event(0, 0x80000008, []byte("fv"))
	f.Add(b.Bytes())
	f.Add([]byte{})
	if real, err := hex.DecodeString(strings.Repeat("00", 40)); err == nil {
		f.Add(real)
	}
	f.Fuzz(func(t *testing.T, log []byte) {
		v, _, err := ReplaySHA256(log, 0)
		if err == nil && len(v) != 32 {
			t.Fatalf("replay gave %d bytes", len(v))
		}
	})
}
