package guest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// EventLogPath is where the guest kernel exposes the firmware's TPM event log (securityfs,
// mounted by the guest's /init). Firmware that passes the kernel a log (OVMF through the
// EFI stub's TCG2 final events; SeaBIOS through the ACPI TPM2 table) makes it exist.
const EventLogPath = "/sys/kernel/security/tpm0/binary_bios_measurements"

// Event types and signatures this file knows (TCG PC Client Platform Firmware Profile,
// 10.4.1 and 9.4.5; UEFI's EV_EFI_VARIABLE_DRIVER_CONFIG).
const (
	evNoAction           = 0x00000003
	evEFIVariableDriver  = 0x80000001
	specIDSignature      = "Spec ID Event03\x00"
	startupLocalitySig   = "StartupLocality\x00"
	algSHA256            = 0x000b
	maxLogEvents         = 1 << 16
	maxLogEventData      = 1 << 20
	secureBootPCR        = 7
	efiGlobalVariableLen = 16
)

// efiGlobalVariable is EFI_GLOBAL_VARIABLE (8be4df61-93ca-11d2-aa0d-00e098032b8c) as
// it is laid out in memory.
var efiGlobalVariable = []byte{0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c}

// Event is one event of a crypto-agile event log, with its SHA-256 digest.
type Event struct {
	PCR    uint32
	Type   uint32
	SHA256 []byte // nil when the event carries no SHA-256 digest
	Data   []byte
}

// ParseEventLog reads a crypto-agile (TCG2) event log: the Spec ID event (in the SHA-1
// format) and every event after it. It fails on a log without the Spec ID event, without
// a SHA-256 bank, or truncated. The input is untrusted (whatever the guest's firmware
// wrote): every length is bounded.
func ParseEventLog(log []byte) ([]Event, error) {
	r := &logReader{b: log}
	// The first event is in the SHA-1 format: pcr, type, sha1[20], size, data.
	pcr := r.u32()
	typ := r.u32()
	r.bytes(20)
	spec := r.bytes(int(r.u32()))
	if r.err != nil {
		return nil, fmt.Errorf("event log: first event: %w", r.err)
	}
	if typ != evNoAction || !bytes.HasPrefix(spec, []byte(specIDSignature)) {
		return nil, errors.New("event log: the first event is not the TCG2 'Spec ID Event03' (a SHA-1-only log is not read)")
	}
	sizes, err := specDigestSizes(spec)
	if err != nil {
		return nil, err
	}
	if _, ok := sizes[algSHA256]; !ok {
		return nil, errors.New("event log: no SHA-256 bank in its Spec ID event")
	}
	events := []Event{{PCR: pcr, Type: typ, Data: spec}}
	for len(r.b) > 0 {
		n := len(events) + 1 // this event's number, for errors
		if n > maxLogEvents {
			return nil, fmt.Errorf("event log: more than %d events", maxLogEvents)
		}
		e := Event{PCR: r.u32(), Type: r.u32()}
		count := r.u32()
		if r.err == nil && count > uint32(len(sizes)) {
			return nil, fmt.Errorf("event log: event %d has %d digests, the log declares %d banks", n, count, len(sizes))
		}
		for i := uint32(0); i < count && r.err == nil; i++ {
			alg := r.u16()
			size, ok := sizes[alg]
			if r.err == nil && !ok {
				return nil, fmt.Errorf("event log: event %d has a digest of algorithm %#x that its Spec ID event does not declare", n, alg)
			}
			d := r.bytes(int(size))
			if alg == algSHA256 {
				e.SHA256 = d
			}
		}
		size := r.u32()
		if r.err == nil && size > maxLogEventData {
			return nil, fmt.Errorf("event log: event %d claims %d bytes of data", n, size)
		}
		e.Data = r.bytes(int(size))
		if r.err != nil {
			return nil, fmt.Errorf("event log: event %d: %w", n, r.err)
		}
		if e.SHA256 == nil && e.Type != evNoAction {
			return nil, fmt.Errorf("event log: event %d (PCR %d, type %#x) has no SHA-256 digest", n, e.PCR, e.Type)
		}
		events = append(events, e)
	}
	return events, nil
}

// ReplaySHA256 extends PCR pcr's SHA-256 bank with the events as the TPM would have and
// returns its value. EV_NO_ACTION events extend nothing; a StartupLocality event sets
// PCR 0's initial locality byte.
func ReplaySHA256(events []Event, pcr uint32) []byte {
	acc := make([]byte, sha256.Size)
	for _, e := range events {
		if e.PCR != pcr {
			continue
		}
		if e.Type == evNoAction {
			if pcr == 0 && bytes.HasPrefix(e.Data, []byte(startupLocalitySig)) && len(e.Data) > len(startupLocalitySig) {
				acc[len(acc)-1] = e.Data[len(startupLocalitySig)]
			}
			continue
		}
		h := sha256.New()
		h.Write(acc)
		h.Write(e.SHA256)
		acc = h.Sum(nil)
	}
	return acc
}

// MeasuredSecureBoot returns the value of the SecureBoot variable the firmware measured
// into PCR 7 (an EV_EFI_VARIABLE_DRIVER_CONFIG event of EFI_GLOBAL_VARIABLE "SecureBoot":
// 1 when it enforces Secure Boot), and false when the log has no such event. The event's
// data is a UEFI_VARIABLE_DATA: VariableName (a GUID), UnicodeNameLength and
// VariableDataLength (u64 each), the name in UTF-16LE, then the data.
func MeasuredSecureBoot(events []Event) (byte, bool) {
	name := utf16le("SecureBoot")
	for _, e := range events {
		if e.PCR != secureBootPCR || e.Type != evEFIVariableDriver {
			continue
		}
		r := &logReader{b: e.Data}
		guid := r.bytes(efiGlobalVariableLen)
		nameLen, dataLen := r.u64(), r.u64()
		if r.err != nil || !bytes.Equal(guid, efiGlobalVariable) || nameLen != uint64(len(name)/2) || dataLen != 1 {
			continue
		}
		if n := r.bytes(len(name)); r.err == nil && bytes.Equal(n, name) {
			if v := r.bytes(1); r.err == nil {
				return v[0], true
			}
		}
	}
	return 0, false
}

func utf16le(s string) []byte {
	b := make([]byte, 0, 2*len(s))
	for _, c := range []byte(s) {
		b = append(b, c, 0)
	}
	return b
}

// specDigestSizes reads the algorithm table of a Spec ID Event03 (signature[16],
// platformClass u32, versions 3 bytes, uintnSize u8, numberOfAlgorithms u32, then
// {algorithmId u16, digestSize u16}...).
func specDigestSizes(spec []byte) (map[uint16]uint16, error) {
	r := &logReader{b: spec[len(specIDSignature):]}
	r.bytes(4 + 3 + 1)
	n := r.u32()
	if r.err == nil && (n == 0 || n > 16) {
		return nil, fmt.Errorf("event log: the Spec ID event declares %d algorithms", n)
	}
	sizes := map[uint16]uint16{}
	for i := uint32(0); i < n && r.err == nil; i++ {
		alg, size := r.u16(), r.u16()
		if r.err == nil && (size == 0 || size > 64) {
			return nil, fmt.Errorf("event log: the Spec ID event gives algorithm %#x a digest of %d bytes", alg, size)
		}
		sizes[alg] = size
	}
	if r.err != nil {
		return nil, fmt.Errorf("event log: Spec ID event: %w", r.err)
	}
	if s, ok := sizes[algSHA256]; ok && s != sha256.Size {
		return nil, fmt.Errorf("event log: the Spec ID event gives SHA-256 digests %d bytes", s)
	}
	return sizes, nil
}

// logReader reads little-endian fields; the first short read sets err and later reads
// return zeros.
type logReader struct {
	b   []byte
	err error
}

func (r *logReader) bytes(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = fmt.Errorf("truncated: %d bytes wanted, %d left", n, len(r.b))
		return nil
	}
	b := r.b[:n]
	r.b = r.b[n:]
	return b
}

func (r *logReader) u32() uint32 {
	if b := r.bytes(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *logReader) u64() uint64 {
	if b := r.bytes(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (r *logReader) u16() uint16 {
	if b := r.bytes(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}
