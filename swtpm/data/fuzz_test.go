package data

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"
)

// FuzzReader checks that framing does not depend on how reads split the stream and that
// every command returned is well-formed. The first byte picks the split.
func FuzzReader(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		mode, stream := in[0], in[1:]
		const max = 256
		whole := collect(NewReader(bytes.NewReader(stream), max, time.Second))
		var split io.Reader = bytes.NewReader(stream)
		if mode&1 == 1 {
			split = iotest.OneByteReader(split)
		} else {
			split = iotest.HalfReader(split)
		}
		parts := collect(NewReader(split, max, time.Second))
		if len(whole.cmds) != len(parts.cmds) {
			t.Fatalf("whole read gave %d commands, split reads %d", len(whole.cmds), len(parts.cmds))
		}
		for i := range whole.cmds {
			if !bytes.Equal(whole.cmds[i], parts.cmds[i]) {
				t.Fatalf("command %d differs: %x vs %x", i, whole.cmds[i], parts.cmds[i])
			}
			c := whole.cmds[i]
			if len(c) < HeaderSize || len(c) > max {
				t.Fatalf("command %d has %d bytes, outside [%d, %d]", i, len(c), HeaderSize, max)
			}
		}
		var se1, se2 *SizeError
		if errors.As(whole.err, &se1) != errors.As(parts.err, &se2) {
			t.Fatalf("final errors differ: %v vs %v", whole.err, parts.err)
		}
	})
}

type result struct {
	cmds [][]byte
	err  error
}

func collect(r *Reader) result {
	var res result
	for i := 0; i < 1000; i++ {
		c, err := r.Next()
		if err != nil {
			res.err = err
			return res
		}
		res.cmds = append(res.cmds, append([]byte(nil), c.Bytes...))
	}
	return res
}
