package ctrl

import (
	"errors"
	"reflect"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the control parser. Seeds (testdata/fuzz/FuzzParse)
// hold every command, padded and unpadded, truncated and oversized.
func FuzzParse(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		req, need, err := Parse(b)
		switch {
		case err != nil:
			var pe *ParseError
			if !errors.As(err, &pe) || pe.Result == ResSuccess || req != nil || need != 0 {
				t.Fatalf("Parse(%x) = %v, %d, %v: an error must be a *ParseError with a failure result", b, req, need, err)
			}
		case need > 0:
			if need <= len(b) || need > 16+MaxStateBlob || req != nil {
				t.Fatalf("Parse(%x) need = %d with %d bytes: must ask for more, within bounds", b, need, len(b))
			}
			if e := Incomplete(b); e.Result != ResBadParameter {
				t.Fatalf("Incomplete(%x) = %v", b, e)
			}
		default:
			if req == nil {
				t.Fatalf("Parse(%x) returned neither request, need nor error", b)
			}
			// The canonical encoding parses back to the same request.
			again, need2, err2 := Parse(req.Marshal())
			if err2 != nil || need2 != 0 || !reflect.DeepEqual(normalise(again), normalise(req)) {
				t.Fatalf("Parse(Marshal(%#v)) = %#v, %d, %v", req, again, need2, err2)
			}
		}
	})
}

// normalise drops encoding details that Marshal does not reproduce (nil vs empty data).
func normalise(r Request) Request {
	switch v := r.(type) {
	case HashData:
		if len(v.Data) == 0 {
			v.Data = nil
		}
		return v
	case SetStateBlob:
		if len(v.Data) == 0 {
			v.Data = nil
		}
		return v
	}
	return r
}
