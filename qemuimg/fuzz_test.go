package qemuimg

import (
	"bytes"
	"testing"
)

// FuzzParseInfo feeds qemu-img's JSON reports to the parsers: a guest-controlled image can
// put what it likes in the fields qemu-img shows (backing file names, for one).
func FuzzParseInfo(f *testing.F) {
	f.Add([]byte(`{"virtual-size": 1, "filename": "/v/b", "format": "raw", "actual-size": 0}`))
	f.Add([]byte(`{"format": "qcow2", "filename": "/v/c", "format-specific": {"type": "qcow2", "data": {"encrypt": {"format": "luks", "slots": [{"active": true, "iters": 4000}]}}}}`))
	f.Add([]byte(`{"format": "luks", "format-specific": {"type": "luks", "data": {"cipher-alg": "aes-256", "slots": []}}}`))
	f.Add([]byte(`[{"format": "qcow2", "backing-filename": "/b", "backing-filename-format": "raw"}, {"format": "raw"}]`))
	f.Add([]byte(`{"image-end-offset": 1, "check-errors": 0, "corruptions": 2}`))
	f.Add([]byte(`{"required": 2490368, "fully-allocated": 69533696}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if i, err := ParseInfo(b); err == nil {
			if i.Format == "" {
				t.Fatal("accepted a report without a format")
			}
			if i.Encrypted != (i.LUKS != nil) && i.LUKS != nil {
				t.Fatal("LUKS header without Encrypted")
			}
			if i.LUKS != nil && i.LUKS.ActiveSlots() > len(i.LUKS.Slots) {
				t.Fatal("more active slots than slots")
			}
		}
		if is, err := ParseChain(b); err == nil {
			for _, i := range is {
				if i.Format == "" {
					t.Fatal("chain: accepted a report without a format")
				}
			}
		}
		ParseCheck(b)
		if m, err := ParseMeasure(b); err == nil && m.Required <= 0 {
			t.Fatal("accepted a measurement without a required size")
		}
	})
}

// FuzzProgress feeds qemu-img -p output to the progress reader: reports stay in [0, 1]
// and only grow.
func FuzzProgress(f *testing.F) {
	f.Add([]byte("    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n"))
	f.Add([]byte("(1e2/100%)\r(Inf/100%)\r(-0/100%)\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		last := -1.0
		readProgress(bytes.NewReader(b), func(x float64) {
			if x < 0 || x > 1 || x <= last {
				t.Fatalf("report %v after %v", x, last)
			}
			last = x
		})
	})
}
