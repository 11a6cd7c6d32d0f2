package idletrim

import (
	"strings"
	"testing"
)

// FuzzSelect: whatever smaps holds, Select does not panic (a panic in the trim
// goroutine would end the vTPM), picks only well-formed private file mappings with
// resident pages, and the Trimmer's buffered scan, fed in pieces, picks the same.
// Seeds: testdata/fuzz/FuzzSelect and the records below.
func FuzzSelect(f *testing.F) {
	f.Add([]byte(record("00404000-0085f000 r-xp 00004000 fe:00 10153906    /usr/bin/nkp-swtpm", 1536, 0, 0, "rd ex mr mw me")))
	f.Add([]byte(record("7f4a34a99000-7f4a34a9d000 r--p 001cf000 fe:00 326269  /usr/lib/x86_64-linux-gnu/libc.so.6", 16, 16, 0, "rd mr mw me ac")))
	f.Add([]byte("7ffc2e3f0000-7ffc2e3f2000 r-xp 00000000 00:00 0 [vdso]\nRss: 8 kB\nAnonymous: 0 kB\n"))
	f.Fuzz(func(t *testing.T, smaps []byte) {
		want := Select(smaps)
		for _, r := range want {
			if r.End <= r.Start || r.RSSKiB == 0 || !strings.HasPrefix(r.Path, "/") {
				t.Fatalf("picked %+v", r)
			}
		}
		got, err := scanInPieces(smaps, 13)
		if err != nil {
			t.Fatal(err)
		}
		// Lines longer than the buffer are dropped by scan only; inputs without
		// them must agree.
		long := false
		for _, l := range strings.Split(string(smaps), "\n") {
			long = long || len(l) >= BufSize-13
		}
		if long {
			return
		}
		if len(got) != len(want) {
			t.Fatalf("scan picked %d, Select %d", len(got), len(want))
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("pick %d: scan %+v, Select %+v", i, got[i], want[i])
			}
		}
	})
}
