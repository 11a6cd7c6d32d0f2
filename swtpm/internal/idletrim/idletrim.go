// Package idletrim drops a process' own page-table mappings of its read-only,
// file-backed segments (its program's code and tables, and those of the shared
// libraries it maps), so that an idle nkp-swtpm stops holding the code it ran only
// while starting. Package swtpm calls Trim once a vTPM has been idle for a while
// (Config.IdleTrim); only nkp-swtpm links it.
//
// Trim reads /proc/self/smaps and calls madvise(MADV_DONTNEED) on every mapping that
// Select picks: a private mapping of a file (its path starts with '/', not a device,
// memfd or SysV segment), without write permission, not locked, and with no anonymous
// page (smaps' "Anonymous: 0 kB"). For such a mapping MADV_DONTNEED is lossless: the
// pages were never written, so they are still the file's pages in the page cache and
// fault back in on their next use, as they do after the kernel reclaims them under
// memory pressure. A mapping with anonymous pages (a RELRO segment after relocation,
// anything written before an mprotect to read-only) is never picked: dropping it
// would throw away what was written there. The list is read afresh at each Trim, not
// kept from an earlier one.
//
// Trim allocates nothing on the Go heap (it reads smaps through a buffer of its
// caller's and parses it in place, advising each mapping as soon as its record is
// read): a trim that grew the heap of an idle process would cost more anonymous
// memory than it frees. Cost: the read of smaps (a few hundred microseconds of kernel
// time), one madvise per picked mapping, and, after the trim, a minor fault for each
// window the process touches again (64 KB of fault-around, or the whole large folio
// of the page cache that holds the page, which kernels since 6.18 map at once).
package idletrim

import (
	"bytes"
	"fmt"
	"syscall"
	"unsafe"
)

// Region is one mapping that Select picked.
type Region struct {
	Start, End uintptr
	Path       string
	RSSKiB     uint64 // its resident pages when smaps was read
}

// parser reads smaps line by line and hands each qualifying mapping to pick once its
// record is complete. It keeps no reference to the lines it was given.
type parser struct {
	cur     Region
	path    []byte // cur's path, in pathBuf
	pathBuf [4096]byte
	ok      bool  // cur's header qualified
	anon    int64 // cur's Anonymous field in kB; -1 while not seen
	locked  bool  // cur is mlocked, or an I/O or PFN mapping: madvise refuses them
	pick    func(r Region, path []byte)
}

// flush ends the current record.
func (p *parser) flush() {
	if p.ok && p.anon == 0 && !p.locked && p.cur.RSSKiB > 0 {
		p.pick(p.cur, p.path)
	}
	p.ok, p.anon, p.locked, p.path = false, -1, false, nil
}

// line takes one line of smaps, without its newline.
func (p *parser) line(l []byte) {
	name, rest := field(l)
	if len(name) == 0 {
		return
	}
	if name[len(name)-1] != ':' {
		// A mapping's header: start-end perms offset dev inode [path].
		p.flush()
		p.header(name, rest)
		return
	}
	if !p.ok {
		return
	}
	switch string(name) { // no allocation: a conversion compared at once
	case "Rss:":
		p.cur.RSSKiB = uint64(max(kB(rest), 0))
	case "Anonymous:":
		p.anon = kB(rest)
	case "Locked:":
		if kB(rest) != 0 {
			p.locked = true
		}
	case "VmFlags:":
		for f, r := field(rest); len(f) > 0; f, r = field(r) {
			if string(f) == "lo" || string(f) == "io" || string(f) == "pf" {
				p.locked = true
			}
		}
	}
}

// header parses a mapping's first line (its first field given apart) and says in
// p.ok whether its kind qualifies: a private mapping of a file, not writable and not
// inaccessible (a guard gap), and not a device, memfd or SysV segment.
func (p *parser) header(span, rest []byte) {
	lo, hi, found := bytes.Cut(span, []byte{'-'})
	start, ok1 := hex(lo)
	end, ok2 := hex(hi)
	perms, rest := field(rest)
	_, rest = field(rest) // offset
	_, rest = field(rest) // device
	inode, rest := field(rest)
	path := bytes.TrimSpace(rest)
	if !found || !ok1 || !ok2 || end <= start || len(perms) != 4 || len(inode) == 0 {
		return
	}
	if perms[1] != '-' || perms[3] != 'p' || (perms[0] == '-' && perms[2] == '-') {
		return
	}
	if len(path) == 0 || path[0] != '/' || bytes.HasPrefix(path, []byte("/dev/")) ||
		bytes.HasPrefix(path, []byte("/memfd:")) || bytes.HasPrefix(path, []byte("/SYSV")) {
		return
	}
	p.cur = Region{Start: uintptr(start), End: uintptr(end)}
	p.path = p.pathBuf[:copy(p.pathBuf[:], path)]
	p.ok = true
}

// field returns the first space-separated field of b and what follows it.
func field(b []byte) (f, rest []byte) {
	i := 0
	for i < len(b) && (b[i] == ' ' || b[i] == '\t') {
		i++
	}
	j := i
	for j < len(b) && b[j] != ' ' && b[j] != '\t' {
		j++
	}
	return b[i:j], b[j:]
}

// hex parses a hexadecimal number of up to 16 digits.
func hex(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 16 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		switch {
		case c >= '0' && c <= '9':
			n = n<<4 | uint64(c-'0')
		case c >= 'a' && c <= 'f':
			n = n<<4 | uint64(c-'a'+10)
		default:
			return 0, false
		}
	}
	return n, true
}

// kB reads the value of a " N kB" rest of line, -1 if it has none.
func kB(rest []byte) int64 {
	f, _ := field(rest)
	if len(f) == 0 || len(f) > 18 {
		return -1
	}
	var n int64
	for _, c := range f {
		if c < '0' || c > '9' {
			return -1
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

// Select returns the mappings of smaps (the text of /proc/PID/smaps) that Trim drops,
// in the order smaps lists them. A mapping whose fields it cannot read is left out.
func Select(smaps []byte) []Region {
	var out []Region
	p := parser{anon: -1, pick: func(r Region, path []byte) {
		r.Path = string(path)
		out = append(out, r)
	}}
	for len(smaps) > 0 {
		var l []byte
		l, smaps, _ = bytes.Cut(smaps, []byte{'\n'})
		p.line(l)
	}
	p.flush()
	return out
}

// Result is what one Trim did.
type Result struct {
	Regions int    // mappings dropped
	KiB     uint64 // their resident size before
}

// BufSize is the size of the buffer Trim needs: room for the longest line of smaps
// (a header with a path of PATH_MAX bytes) twice.
const BufSize = 2 * (4096 + 256)

// Trimmer trims this process; its buffer is allocated once, by NewTrimmer, so that a
// Trim allocates nothing. Not for concurrent use.
type Trimmer struct {
	buf   []byte
	p     parser
	res   Result
	first error
}

// NewTrimmer returns a Trimmer with its buffer.
func NewTrimmer() *Trimmer {
	t := &Trimmer{buf: make([]byte, BufSize)}
	t.p.pick = t.advise
	return t
}

// advise drops one picked mapping.
func (t *Trimmer) advise(r Region, path []byte) {
	_, _, e := syscall.Syscall(syscall.SYS_MADVISE, r.Start, r.End-r.Start, syscall.MADV_DONTNEED)
	if e != 0 {
		if t.first == nil {
			t.first = fmt.Errorf("idle trim: madvise %x-%x (%s): %w", r.Start, r.End, path, e)
		}
		return
	}
	t.res.Regions++
	t.res.KiB += r.RSSKiB
}

// Trim drops this process' mappings that Select picks from /proc/self/smaps, read
// afresh. A mapping the kernel refuses to advise is skipped; the first such error is
// returned with what was done.
func (t *Trimmer) Trim() (Result, error) {
	t.res, t.first = Result{}, nil
	// openat by hand: syscall.Open would allocate the path's C string.
	fd, _, e := syscall.Syscall6(syscall.SYS_OPENAT, atFDCWD, uintptr(unsafe.Pointer(&smapsPath[0])),
		syscall.O_RDONLY|syscall.O_CLOEXEC, 0, 0, 0)
	if e != 0 {
		return Result{}, fmt.Errorf("idle trim: open /proc/self/smaps: %w", e)
	}
	defer syscall.Close(int(fd))
	err := t.scan(func(b []byte) (int, error) { return syscall.Read(int(fd), b) })
	if err != nil {
		return t.res, fmt.Errorf("idle trim: read /proc/self/smaps: %w", err)
	}
	return t.res, t.first
}

// smapsPath is /proc/self/smaps as a C string.
var smapsPath = [...]byte{'/', 'p', 'r', 'o', 'c', '/', 's', 'e', 'l', 'f', '/', 's', 'm', 'a', 'p', 's', 0}

const atFDCWD = ^uintptr(99) // AT_FDCWD, -100

// scan parses what read returns, line by line, through t.buf, until read returns 0.
func (t *Trimmer) scan(read func([]byte) (int, error)) error {
	t.p.flush()
	have := 0 // t.buf[:have] holds an unfinished line
	for {
		n, err := read(t.buf[have:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			t.p.ok = false // the record in hand is cut short: leave it
			return err
		}
		if n == 0 {
			break
		}
		b := t.buf[:have+n]
		for {
			i := bytes.IndexByte(b, '\n')
			if i < 0 {
				break
			}
			t.p.line(b[:i])
			b = b[i+1:]
		}
		have = copy(t.buf, b)
		if have == len(t.buf) {
			// A line longer than the buffer (smaps has none: only a header, with its
			// path, can be long): end the record before it, drop this one.
			t.p.flush()
			t.p.ok, have = false, 0
		}
	}
	if have > 0 {
		t.p.line(t.buf[:have])
	}
	t.p.flush()
	return nil
}
