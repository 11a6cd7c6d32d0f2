package state

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"testing"
)

// Child processes: tests re-execute this test binary with NKP_STATE_CHILD set to play
// another process on the same state directory. The directory and a key file path come
// in the environment; the key itself never does.
const (
	envChild   = "NKP_STATE_CHILD"
	envDir     = "NKP_STATE_DIR"
	envKeyFile = "NKP_STATE_KEYFILE"
	envNoSync  = "NKP_STATE_NOSYNC"
	// envLinear says NKP_STATE_DIR is a linear state file (OpenLinear), not a directory.
	envLinear = "NKP_STATE_LINEAR"
)

// store is what the child roles use of a Dir or a Linear.
type store interface {
	Load(name string) ([]byte, error)
	Store(name string, data []byte) error
	Close() error
}

func TestMain(m *testing.M) {
	switch os.Getenv(envChild) {
	case "":
		os.Exit(m.Run())
	case "locker":
		os.Exit(childLocker())
	case "writer":
		os.Exit(childWriter())
	default:
		fmt.Fprintln(os.Stderr, "unknown child role")
		os.Exit(2)
	}
}

func childOpen() (store, error) {
	var opts Options
	if kf := os.Getenv(envKeyFile); kf != "" {
		k, err := ParseKey(KeySpec{Source: KeyFile, Path: kf}, nil)
		if err != nil {
			return nil, err
		}
		defer k.Wipe()
		opts.Key = k
	}
	opts.NoSync = os.Getenv(envNoSync) != ""
	if os.Getenv(envLinear) != "" {
		return OpenLinear(os.Getenv(envDir), opts)
	}
	return Open(os.Getenv(envDir), opts)
}

// childLocker opens the directory, says "locked" and holds it until stdin closes.
func childLocker() int {
	d, err := childOpen()
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("locked")
	_, _ = io.Copy(io.Discard, os.Stdin)
	d.Close()
	return 0
}

// childWriter stores counterBlob(n) for n = current+1, current+2, ... as fast as it can,
// printing each n on stdout once Store returned, until it is killed.
func childWriter() int {
	d, err := childOpen()
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	n, err := loadCounter(d)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	w := bufio.NewWriter(os.Stdout)
	fmt.Fprintln(w, "ready", n)
	w.Flush()
	for {
		n++
		if err := d.Store("permall", counterBlob(n)); err != nil {
			fmt.Fprintln(w, "error:", err)
			w.Flush()
			return 1
		}
		fmt.Fprintln(w, n)
		w.Flush()
	}
}

// counterBlob is a self-checking payload for counter n whose length varies with n, so
// that a torn or mixed file cannot pass for a valid one.
func counterBlob(n uint64) []byte {
	size := 8 + int(n%7)*700 + 32
	b := make([]byte, 8, size)
	binary.BigEndian.PutUint64(b, n)
	for len(b) < size {
		sum := sha256.Sum256(b)
		b = append(b, sum[:min(32, size-len(b))]...)
	}
	return b
}

// loadCounter returns the counter stored in permall (0 if there is none), checking it.
func loadCounter(d store) (uint64, error) {
	b, err := d.Load("permall")
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if len(b) < 8 {
		return 0, fmt.Errorf("counter blob of %d bytes", len(b))
	}
	n := binary.BigEndian.Uint64(b)
	if want := counterBlob(n); string(want) != string(b) {
		return 0, fmt.Errorf("counter blob %d does not match its content (%d bytes, want %d)", n, len(b), len(want))
	}
	return n, nil
}
