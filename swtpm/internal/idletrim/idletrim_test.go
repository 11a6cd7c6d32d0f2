package idletrim

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"
)

// record is one smaps record: header, then its fields.
func record(header string, rss, anon, locked int, flags string) string {
	return header + "\n" +
		"Size:                100 kB\n" +
		"Rss:                 " + itoa(rss) + " kB\n" +
		"Pss:                 " + itoa(rss) + " kB\n" +
		"Anonymous:           " + itoa(anon) + " kB\n" +
		"Locked:              " + itoa(locked) + " kB\n" +
		"VmFlags: " + flags + "\n"
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

func TestSelect(t *testing.T) {
	const bin = "/usr/bin/nkp-swtpm"
	tests := []struct {
		name string
		rec  string
		want bool
	}{
		{"text", record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex mr mw me"), true},
		{"rodata", record("0085f000-00b15000 r--p 0045f000 fe:00 10153906    "+bin, 1792, 0, 0, "rd mr mw me"), true},
		{"shared library text", record("7f4a34505000-7f4a3452b000 r-xp 00026000 fe:00 326269  /usr/lib/x86_64-linux-gnu/libc.so.6", 600, 0, 0, "rd ex mr mw me"), true},
		{"deleted binary (upgraded while running)", record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin+" (deleted)", 64, 0, 0, "rd ex mr mw me"), true},
		{"RELRO: r--p with anonymous pages", record("7f4a34a99000-7f4a34a9d000 r--p 001cf000 fe:00 326269  /usr/lib/x86_64-linux-gnu/libc.so.6", 16, 16, 0, "rd mr mw me ac"), false},
		{"partly written read-only mapping", record("00b15000-00b6c000 r--p 00715000 fe:00 10153906    "+bin, 348, 8, 0, "rd mr mw me ac"), false},
		{"writable data", record("00b6c000-00b88000 rw-p 0076c000 fe:00 10153906    "+bin, 84, 0, 0, "rd wr mr mw me ac"), false},
		{"anonymous", record("5cc72800000-5cc72c00000 rw-p 00000000 00:00 0", 708, 708, 0, "rd wr mr mw me ac"), false},
		{"anonymous read-only", record("7f0000000000-7f0000010000 r--p 00000000 00:00 0", 8, 0, 0, "rd mr mw me"), false},
		{"heap", record("035f9000-036a1000 rw-p 00000000 00:00 0                                  [heap]", 276, 276, 0, "rd wr mr mw me ac"), false},
		{"vdso", record("7ffc2e3f0000-7ffc2e3f2000 r-xp 00000000 00:00 0                          [vdso]", 8, 0, 0, "rd ex mr mw me de"), false},
		{"vvar", record("7ffc2e3ec000-7ffc2e3f0000 r--p 00000000 00:00 0                          [vvar]", 0, 0, 0, "rd mr pf io de dd"), false},
		{"vsyscall", record("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]", 0, 0, 0, "ex"), false},
		{"stack", record("7ffc2e274000-7ffc2e295000 rw-p 00000000 00:00 0                          [stack]", 16, 16, 0, "rd wr mr mw me gd ac"), false},
		{"shared file mapping", record("7f0000000000-7f0000010000 r--s 00000000 fe:00 12  /var/lib/x", 8, 0, 0, "rd sh mr mw me ms"), false},
		{"guard gap", record("7f4a34500000-7f4a34505000 ---p 0002b000 fe:00 326269  /usr/lib/x86_64-linux-gnu/libc.so.6", 0, 0, 0, "mr mw me"), false},
		{"locked", record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 1536, "rd ex mr mw me lo"), false},
		{"mlocked flag alone", record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex mr mw me lo"), false},
		{"device", record("7f0000000000-7f0000010000 r--p 00000000 00:05 3  /dev/mem", 8, 0, 0, "rd mr mw me io pf"), false},
		{"memfd", record("7f0000000000-7f0000010000 r--p 00000000 00:01 5  /memfd:x (deleted)", 8, 0, 0, "rd mr mw me"), false},
		{"nothing resident", record("00400000-00404000 r--p 00000000 fe:00 10153906    "+bin, 0, 0, 0, "rd mr mw me"), false},
		{"no Anonymous field", strings.Replace(record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex"), "Anonymous:           0 kB\n", "", 1), false},
		{"garbled Anonymous", strings.Replace(record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex"), "Anonymous:           0 kB", "Anonymous: zero kB", 1), false},
		{"garbled address", record("0040400g-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex"), false},
		{"end before start", record("0085f000-00404000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex"), false},
	}
	// Each alone, and all in one text: a record's fields never leak into the next.
	var all strings.Builder
	var want []string
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Select([]byte(tt.rec))
			if (len(got) == 1) != tt.want || len(got) > 1 {
				t.Fatalf("Select picked %+v, want picked=%v", got, tt.want)
			}
			if tt.want && got[0].RSSKiB == 0 {
				t.Errorf("picked %+v without its Rss", got[0])
			}
		})
		all.WriteString(tt.rec)
		if tt.want {
			want = append(want, tt.name)
		}
	}
	got := Select([]byte(all.String()))
	if len(got) != len(want) {
		t.Fatalf("from all records Select picked %d, want %d (%v): %+v", len(got), len(want), want, got)
	}
	if got[0].Start != 0x404000 || got[0].End != 0x85f000 || got[0].Path != bin || got[0].RSSKiB != 1536 {
		t.Errorf("first pick %+v, want 404000-85f000 %s 1536 KiB", got[0], bin)
	}
	if got[3].Path != bin+" (deleted)" {
		t.Errorf("path of a deleted file: %q", got[3].Path)
	}
}

// mapFile maps f privately with prot and returns the mapping.
func mapFile(t *testing.T, f *os.File, size, prot int) []byte {
	t.Helper()
	b, err := syscall.Mmap(int(f.Fd()), 0, size, prot, syscall.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Munmap(b) })
	return b
}

// regionOf returns the smaps fields of the mapping that starts at b.
func regionOf(t *testing.T, b []byte) (rss, anon int64) {
	t.Helper()
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	start := uintptr(unsafe.Pointer(&b[0]))
	in := false
	rss, anon = -1, -1
	for _, l := range bytes.Split(smaps, []byte("\n")) {
		name, rest := field(l)
		if len(name) > 0 && name[len(name)-1] != ':' {
			lo, _, _ := bytes.Cut(name, []byte("-"))
			a, _ := hex(lo)
			in = uintptr(a) == start
			continue
		}
		if in && string(name) == "Rss:" {
			rss = kB(rest)
		}
		if in && string(name) == "Anonymous:" {
			anon = kB(rest)
		}
	}
	if rss < 0 || anon < 0 {
		t.Fatalf("mapping at %x not in /proc/self/smaps", start)
	}
	return rss, anon
}

func picked(rs []Region, b []byte) bool {
	start := uintptr(unsafe.Pointer(&b[0]))
	for _, r := range rs {
		if r.Start == start {
			return true
		}
	}
	return false
}

// TestTrimThisProcess trims the test process itself: a read-only private mapping of
// a file that was written through before an mprotect to read-only (its pages are
// anonymous copies now, like a RELRO segment) is left alone and keeps what was
// written; an untouched read-only mapping of the same file is dropped and reads the
// file's content again. The test binary's own code is trimmed too, and the test goes
// on running from it.
func TestTrimThisProcess(t *testing.T) {
	const size = 64 << 10
	content := bytes.Repeat([]byte("idle trim keeps the file's pages\n"), size/33+1)[:size]
	path := filepath.Join(t.TempDir(), "mapped")
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fw, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Close()

	relro := mapFile(t, fw, size, syscall.PROT_READ|syscall.PROT_WRITE)
	copy(relro, "relocated")
	relro[size-1] = '!'
	if err := syscall.Mprotect(relro, syscall.PROT_READ); err != nil {
		t.Fatal(err)
	}
	clean := mapFile(t, f, size, syscall.PROT_READ)
	if !bytes.Equal(clean, content) { // faults every page in
		t.Fatal("the read-only mapping does not read the file's content")
	}
	if rss, anon := regionOf(t, relro); anon == 0 || rss == 0 {
		t.Fatalf("written mapping: Rss %d kB, Anonymous %d kB; want both above 0", rss, anon)
	}
	if rss, anon := regionOf(t, clean); rss < size>>10 || anon != 0 {
		t.Fatalf("read mapping: Rss %d kB, Anonymous %d kB; want %d and 0", rss, anon, size>>10)
	}

	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	sel := Select(smaps)
	if picked(sel, relro) {
		t.Fatal("Select picked the mapping with written (anonymous) pages")
	}
	if !picked(sel, clean) {
		t.Fatal("Select left out a clean read-only private file mapping")
	}

	res, err := NewTrimmer().Trim()
	if err != nil {
		t.Fatalf("Trim: %v (did %+v)", err, res)
	}
	if res.Regions < 2 || res.KiB < size>>10 {
		t.Errorf("Trim did %+v; want the test binary's segments and the clean mapping", res)
	}
	if rss, _ := regionOf(t, clean); rss != 0 {
		t.Errorf("clean mapping still has %d kB resident after Trim", rss)
	}
	if rss, anon := regionOf(t, relro); anon == 0 || rss == 0 {
		t.Errorf("written mapping after Trim: Rss %d kB, Anonymous %d kB; it must not be touched", rss, anon)
	}
	if !bytes.HasPrefix(relro, []byte("relocated")) || relro[size-1] != '!' || !bytes.Equal(relro[9:size-1], content[9:size-1]) {
		t.Error("the written mapping lost what was written to it")
	}
	if !bytes.Equal(clean, content) {
		t.Error("the dropped mapping does not read the file's content again")
	}
}

// TestTrimAllocatesNothing: a trim that grew the heap of an idle nkp-swtpm would cost
// more than it frees.
func TestTrimAllocatesNothing(t *testing.T) {
	tr := NewTrimmer()
	var err error
	allocs := testing.AllocsPerRun(5, func() { _, err = tr.Trim() })
	if err != nil {
		t.Fatal(err)
	}
	if allocs != 0 {
		t.Errorf("Trim allocates %v times per call, want 0", allocs)
	}
}

// TestTrimSplitReads feeds smaps to the Trimmer's scan in 7-byte reads: it picks
// what Select picks from the whole text.
func TestTrimSplitReads(t *testing.T) {
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	want := Select(smaps)
	got, err := scanInPieces(smaps, 7)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) || len(want) == 0 {
		t.Fatalf("split reads picked %d mappings, whole text %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("pick %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

// TestTrimOverlongLine: a line longer than the buffer is dropped with its record,
// and the records around it are read.
func TestTrimOverlongLine(t *testing.T) {
	const bin = "/usr/bin/nkp-swtpm"
	text := record("00404000-0085f000 r-xp 00004000 fe:00 10153906    "+bin, 1536, 0, 0, "rd ex") +
		record("00900000-00a00000 r--p 00004000 fe:00 10153906    /"+strings.Repeat("x", BufSize), 64, 0, 0, "rd") +
		record("00b00000-00c00000 r--p 00004000 fe:00 10153906    "+bin, 64, 0, 0, "rd")
	var got []uintptr
	tr := NewTrimmer()
	tr.p.pick = func(r Region, path []byte) { got = append(got, r.Start) }
	rest := []byte(text)
	if err := tr.scan(func(b []byte) (int, error) {
		n := copy(b, rest)
		rest = rest[n:]
		return n, nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != 0x404000 || got[1] != 0xb00000 {
		t.Errorf("picked %x, want 404000 and b00000", got)
	}
}

// BenchmarkTrim times one trim of the test process (its smaps read and parsed, its
// read-only file mappings advised): go test -run XXX -bench Trim ./swtpm/internal/idletrim
func BenchmarkTrim(b *testing.B) {
	tr := NewTrimmer()
	for b.Loop() {
		if _, err := tr.Trim(); err != nil {
			b.Fatal(err)
		}
	}
}

// scanInPieces runs a Trimmer's buffered scan over smaps handed to it at most n bytes
// per read, and returns what it picked instead of advising anything.
func scanInPieces(smaps []byte, n int) ([]Region, error) {
	var got []Region
	tr := NewTrimmer()
	tr.p.pick = func(r Region, path []byte) {
		r.Path = string(path)
		got = append(got, r)
	}
	rest := smaps
	err := tr.scan(func(b []byte) (int, error) {
		k := copy(b, rest[:min(n, len(rest))])
		rest = rest[k:]
		return k, nil
	})
	return got, err
}
