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

// Event types and the signature ReplaySHA256 treats specially (TCG PC Client Platform
// Firmware Profile, 10.4.1 and 9.4.5).
const (
	evNoAction        = 0x00000003
	specIDSignature   = "Spec ID Event03\x00"
	startupLocalitySg = "StartupLocality\x00"
	algSHA256         = 0x000b
	maxLogEvents      = 1 << 16
	maxLogEventData   = 1 << 20
)

// ReplaySHA256 replays a crypto-agile (TCG2) event log as the TPM would have extended it
// and returns PCR pcr's SHA-256 value and the number of events in the log. It fails on a
// log without the Spec ID event, without a SHA-256 bank, or truncated. EV_NO_ACTION
// events extend nothing; a StartupLocality event sets PCR 0's initial locality byte.
// The input is untrusted (whatever the guest's firmware wrote): every length is bounded.
func ReplaySHA256(log []byte, pcr uint32) (value []byte, events int, err error) {
	r := &logReader{b: log}
	// The first event is in the SHA-1 format: pcr, type, sha1[20], size, data.
	r.u32()
	typ := r.u32()
	r.bytes(20)
	spec := r.bytes(int(r.u32()))
	if r.err != nil {
		return nil, 0, fmt.Errorf("event log: first event: %w", r.err)
	}
	if typ != evNoAction || !bytes.HasPrefix(spec, []byte(specIDSignature)) {
		return nil, 0, errors.New("event log: the first event is not the TCG2 'Spec ID Event03' (a SHA-1-only log is not replayed)")
	}
	sizes, err := specDigestSizes(spec)
	if err != nil {
		return nil, 0, err
	}
	if _, ok := sizes[algSHA256]; !ok {
		return nil, 0, errors.New("event log: no SHA-256 bank in its Spec ID event")
	}
	acc := make([]byte, sha256.Size)
	events = 1
	for len(r.b) > 0 {
		if events > maxLogEvents {
			return nil, 0, fmt.Errorf("event log: more than %d events", maxLogEvents)
		}
		index := r.u32()
		typ := r.u32()
		count := r.u32()
		if r.err == nil && count > uint32(len(sizes)) {
			return nil, 0, fmt.Errorf("event log: event %d has %d digests, the log declares %d banks", events+1, count, len(sizes))
		}
		var digest []byte
		for i := uint32(0); i < count && r.err == nil; i++ {
			alg := r.u16()
			size, ok := sizes[alg]
			if r.err == nil && !ok {
				return nil, 0, fmt.Errorf("event log: event %d has a digest of algorithm %#x that its Spec ID event does not declare", events+1, alg)
			}
			d := r.bytes(int(size))
			if alg == algSHA256 {
				digest = d
			}
		}
		size := r.u32()
		if r.err == nil && size > maxLogEventData {
			return nil, 0, fmt.Errorf("event log: event %d claims %d bytes of data", events+1, size)
		}
		data := r.bytes(int(size))
		if r.err != nil {
			return nil, 0, fmt.Errorf("event log: event %d: %w", events+1, r.err)
		}
		events++
		if index != pcr {
			continue
		}
		if typ == evNoAction {
			if pcr == 0 && bytes.HasPrefix(data, []byte(startupLocalitySg)) && len(data) > len(startupLocalitySg) {
				acc[len(acc)-1] = data[len(startupLocalitySg)]
			}
			continue
		}
		if digest == nil {
			return nil, 0, fmt.Errorf("event log: event %d for PCR %d has no SHA-256 digest", events, pcr)
		}
		h := sha256.New()
		h.Write(acc)
		h.Write(digest)
		acc = h.Sum(nil)
	}
	return acc, events, nil
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

func (r *logReader) u16() uint16 {
	if b := r.bytes(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}
