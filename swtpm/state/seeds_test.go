package state

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

// TestWriteFuzzSeeds writes the checked-in seed corpora of the fuzz targets
// (testdata/fuzz/Fuzz*/) when NKP_UPDATE_FIXTURES=1: real swtpm 0.7.1 files, the
// header-less fixtures, small nkp files of each format version, and linear headers. Otherwise it checks
// that every target has seeds.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("NKP_UPDATE_FIXTURES") != "1" {
		for _, target := range []string{"FuzzDecodeFile", "FuzzDecodeLegacy", "FuzzSlots", "FuzzDecodeKey", "FuzzLinearLayout"} {
			if m, _ := filepath.Glob(filepath.Join("testdata/fuzz", target, "*")); len(m) == 0 {
				t.Errorf("no checked-in seeds for %s (NKP_UPDATE_FIXTURES=1 go test -run TestWriteFuzzSeeds)", target)
			}
		}
		return
	}
	s, err := newSealer(fuzzKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(target, name string, vals ...any) {
		var b strings.Builder
		b.WriteString("go test fuzz v1\n")
		for _, v := range vals {
			switch v := v.(type) {
			case []byte:
				fmt.Fprintf(&b, "[]byte(%q)\n", v)
			case uint8:
				fmt.Fprintf(&b, "byte(%q)\n", v)
			case uint16:
				fmt.Fprintf(&b, "uint16(%d)\n", v)
			case uint32:
				fmt.Fprintf(&b, "uint32(%d)\n", v)
			case bool:
				fmt.Fprintf(&b, "bool(%v)\n", v)
			}
		}
		dir := filepath.Join("testdata/fuzz", target)
		os.MkdirAll(dir, 0o755)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	v1, _ := s.seal(1, []byte("nkp version 1 permall"))
	write("FuzzDecodeFile", "nkp-v1-permall", v1, uint8(0), true, false, false)
	write("FuzzDecodeFile", "nkp-v3-two-records", smallSlotFile(t, s, 1, fuzzDirID, []byte("older"), []byte("newer")), uint8(0), true, true, false)
	write("FuzzDecodeFile", "nkp-v3-unbound-dir", smallSlotFile(t, s, 2, fuzzDirID, []byte("volatile")), uint8(1), true, false, true)
	// Small files of each swtpm format (the real ones are KBs, which slows every
	// mutation; the fixture tests read those): the fuzzer works at parser speed.
	small := []byte("\x00\x03\xab\x36\x47\x23 small permall")
	plain, _ := envelope.EncodeFile(small, nil)
	keyed, _ := envelope.EncodeFile(small, fuzzKey)
	write("FuzzDecodeFile", "swtpm-plain-permall", plain, uint8(0), false, false, false)
	write("FuzzDecodeFile", "swtpm-key256-permall", keyed, uint8(0), true, false, false)
	write("FuzzDecodeFile", "bare-permall", small, uint8(0), false, false, false)
	write("FuzzDecodeFile", "headerless-key128-permall", encryptHeaderless(fuzzKey[:16], small), uint8(0), true, false, false)
	for _, c := range []struct {
		name string
		key  []byte
		sel  uint8
	}{{"bare", nil, 0}, {"key128", fuzzKey[:16], 1}, {"key256", fuzzKey, 2}} {
		perm := small
		if c.key != nil {
			perm = encryptHeaderless(c.key, perm)
		}
		write("FuzzDecodeLegacy", c.name+"-permall", perm, uint8(0), c.sel)
	}
	write("FuzzDecodeLegacy", "garbage", []byte("neither a swtpm blob nor libtpms'"), uint8(1), uint8(0))
	for _, off := range []uint16{9, 33, 50, 70, 100, 160 + 9, 160 + 33, 160 + 70, 160 + 100} {
		write("FuzzSlots", fmt.Sprintf("flip-%d", off), off, uint8(1))
	}
	// Linear headers: swtpm 0.7.1's (permall and volatilestate), and one of nkp's with
	// the sections where its stores put them (a gap after the header, a removed entry).
	for _, name := range []string{"linear-plain", "linear-key256"} {
		b, err := os.ReadFile(filepath.Join(fixtures, name, "linear.img"))
		if err != nil {
			t.Fatal(err)
		}
		write("FuzzLinearLayout", "swtpm-"+name, b[:linearHeaderSize], uint32(len(b)), uint16(1400), uint8(0))
	}
	p := filepath.Join(t.TempDir(), "tpm.img")
	l, err := OpenLinear(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []struct {
		name string
		n    int
	}{{"permall", 300}, {"volatilestate", 2000}, {"savestate", 700}, {"permall", 1500}, {"savestate", -1}} {
		if st.n < 0 {
			l.Delete(st.name)
		} else {
			l.Store(st.name, make([]byte, st.n))
		}
	}
	l.Close()
	b, _ := os.ReadFile(p)
	write("FuzzLinearLayout", "nkp-moved", b[:linearHeaderSize], uint32(len(b)), uint16(2500), uint8(1))
	write("FuzzLinearLayout", "new", make([]byte, linearHeaderSize), uint32(0), uint16(1), uint8(2))
}
