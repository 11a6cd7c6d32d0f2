//go:build cgo

package libtpms

import (
	"errors"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/data"
)

// FuzzFrameMatchesData holds the data loop's C framing (nkp_frame) to package data's
// Frame, which the Go data path uses and which has its own fuzz target: on every input
// both find the same command, ask for the same number of bytes, or refuse the same size.
func FuzzFrameMatchesData(f *testing.F) {
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 1, 0x7b, 0, 8}, uint16(4096))
	f.Add([]byte{0, 0, 0, 8, 3, 0, 0, 0, 0x0c, 0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 1, 0x7b, 0, 8}, uint16(4096))
	f.Add([]byte{0x80, 0x01, 0, 0, 0x10, 0}, uint16(4096))
	f.Add([]byte{0, 0, 0, 8, 0, 0, 0, 0}, uint16(4096))
	f.Add([]byte{0x80, 0x02, 0, 0, 0, 5}, uint16(10))
	f.Add([]byte{0, 0}, uint16(0))
	f.Fuzz(func(t *testing.T, b []byte, max uint16) {
		r, off, n, need, size, prefixed, loc := cFrame(b, uint32(max))
		cmd, gn, gneed, err := data.Frame(b, int(max))
		var se *data.SizeError
		switch {
		case errors.As(err, &se):
			if r != -1 || size != se.Size || prefixed != se.Prefixed {
				t.Fatalf("%x max %d: Go refuses size %d (prefixed %v); C: r=%d size=%d prefixed=%v", b, max, se.Size, se.Prefixed, r, size, prefixed)
			}
		case err != nil:
			t.Fatalf("%x: Go Frame: %v", b, err)
		case gn > 0:
			if r != 1 || n != gn || prefixed != cmd.Prefixed || (prefixed && loc != cmd.Locality) ||
				int(size) != len(cmd.Bytes) || off != gn-len(cmd.Bytes) {
				t.Fatalf("%x max %d: Go finds %d bytes (%d of command, prefixed %v, locality %d); C: r=%d n=%d off=%d size=%d prefixed=%v locality %d",
					b, max, gn, len(cmd.Bytes), cmd.Prefixed, cmd.Locality, r, n, off, size, prefixed, loc)
			}
		default:
			if r != 0 || need != gneed {
				t.Fatalf("%x max %d: Go needs %d bytes; C: r=%d need=%d", b, max, gneed, r, need)
			}
		}
	})
}
