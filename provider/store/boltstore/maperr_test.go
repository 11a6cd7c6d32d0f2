package boltstore

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	berrors "go.etcd.io/bbolt/errors"

	"github.com/nkp-dev/nkp/provider/store"
)

func TestMapErr(t *testing.T) {
	cases := []struct {
		in   error
		want error // nil: no sentinel added
	}{
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.EROFS}, store.ErrReadOnly},
		{berrors.ErrDatabaseReadOnly, store.ErrReadOnly},
		{fmt.Errorf("write: %w", syscall.ENOSPC), store.ErrFull},
		{syscall.EDQUOT, store.ErrFull},
		{berrors.ErrMaxSizeReached, store.ErrFull},
		{berrors.ErrDatabaseNotOpen, store.ErrClosed},
		{syscall.EIO, nil},
	}
	sentinels := []error{store.ErrReadOnly, store.ErrFull, store.ErrClosed}
	for _, c := range cases {
		got := mapErr(c.in)
		if !errors.Is(got, c.in) {
			t.Errorf("mapErr(%v) = %v lost the cause", c.in, got)
		}
		for _, s := range sentinels {
			if errors.Is(got, s) != (s == c.want) {
				t.Errorf("mapErr(%v) = %v: errors.Is(%v) = %v", c.in, got, s, errors.Is(got, s))
			}
		}
	}
}
