package guest

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
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

// efiVariable is a UEFI_VARIABLE_DATA of EFI_GLOBAL_VARIABLE name with data.
func efiVariable(name string, data []byte) []byte {
	var b logBuilder
	b.Write(efiGlobalVariable)
	binary.Write(&b.Buffer, binary.LittleEndian, uint64(len(name)))
	binary.Write(&b.Buffer, binary.LittleEndian, uint64(len(data)))
	b.Write(utf16le(name))
	b.Write(data)
	return b.Bytes()
}

func TestEventLog(t *testing.T) {
	b := newLog()
	b.event(0, evNoAction, append([]byte(startupLocalitySig), 3))
	b.event(0, 0x80000008, []byte("firmware volume"))
	b.event(7, evEFIVariableDriver, efiVariable("SecureBoot", []byte{1}))
	b.event(0, 0x4, []byte("separator"))
	log := b.Bytes()
	events, err := ParseEventLog(log)
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 5 {
		t.Fatalf("%d events, want 5", len(events))
	}
	if v, ok := MeasuredSecureBoot(events); v != 1 || !ok {
		t.Errorf("MeasuredSecureBoot = %d, %v; want 1, true", v, ok)
	}
	if v, ok := MeasuredSecureBoot(events[:2]); ok {
		t.Errorf("MeasuredSecureBoot without the event = %d, true; want false", v)
	}
	other := newLog()
	other.event(7, evEFIVariableDriver, efiVariable("SecureBootX", []byte{1}))
	other.event(7, evEFIVariableDriver, efiVariable("PK", []byte{1}))
	if ev, err := ParseEventLog(other.Bytes()); err != nil {
		t.Fatal(err)
	} else if v, ok := MeasuredSecureBoot(ev); ok {
		t.Errorf("MeasuredSecureBoot of other variables = %d, true; want false", v)
	}

	start := make([]byte, 32)
	start[31] = 3
	want0 := extend(extend(start, "firmware volume"), "separator")
	want7 := extend(make([]byte, 32), string(efiVariable("SecureBoot", []byte{1})))
	for _, tc := range []struct {
		pcr  uint32
		want []byte
	}{{0, want0}, {7, want7}, {4, make([]byte, 32)}} {
		if got := ReplaySHA256(events, tc.pcr); !bytes.Equal(got, tc.want) {
			t.Errorf("PCR %d: %x, want %x", tc.pcr, got, tc.want)
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
		if _, err := ParseEventLog(tc.log); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// FuzzParseEventLog feeds arbitrary bytes to the parser: it must not panic, and what it
// parses replays to 32 bytes and yields a Secure Boot value or none without panicking.
func FuzzParseEventLog(f *testing.F) {
	b := newLog()
	b.event(0, 0x80000008, []byte("fv"))
	b.event(7, evEFIVariableDriver, efiVariable("SecureBoot", []byte{1}))
	f.Add(b.Bytes())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, log []byte) {
		events, err := ParseEventLog(log)
		if err != nil {
			return
		}
		if v := ReplaySHA256(events, 0); len(v) != 32 {
			t.Fatalf("replay gave %d bytes", len(v))
		}
		MeasuredSecureBoot(events)
	})
}
