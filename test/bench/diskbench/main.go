// Command diskbench measures what nkp's LUKS disks cost against plain images, in one run
// with the rounds of each side interleaved, and prints a markdown table of medians and
// ratios (candidate ÷ reference). Every section has a calibration row (the reference
// against itself) so that the machine's noise shows:
//
//   - unlock: opening an image and reading 4 KiB with qemu-io, minus the same on a plain
//     image: nkp's keyslots (qemuimg.DefaultIterTime) against QEMU's default PBKDF time,
//     LUKS in qcow2 and raw LUKS (target: ≤ 20 ms per disk);
//   - protect: converting a raw image full of data into qcow2+LUKS with nkp's qemuimg,
//     alone and followed by the compare protect does, against a plain
//     `qemu-img convert -O qcow2` of the same source;
//   - I/O with qemu-io: 1 MiB sequential writes and reads, and 4 KiB random writes and
//     reads at queue depth 1 (one synchronous request after another) and at -depth
//     (aio_write/aio_read that many at a time, then aio_flush, as a guest with a queue),
//     on LUKS-in-qcow2 (AES-256-XTS and AES-128-XTS) against plain qcow2 of the same
//     size, and raw LUKS against plain raw, for each -cache mode (writeback, libvirt's
//     default for a <disk> without cache=, and none, O_DIRECT). Every image is written
//     in full first, so reads find data (not unallocated qcow2 clusters, which are read
//     as zeros without decryption) and the page cache is equally warm on both sides.
//     One qemu-io process runs all the requests of a round; the clock starts when it
//     has started and opened the image (a first 512-byte read is answered), so process
//     start and unlock are not counted. Writes end with one flush. Each random row has
//     a "per request" row: wall time, CPU time of all qemu-io's threads and voluntary
//     context switches per request, which show where LUKS' extra time goes;
//   - crypto: QEMU's cipher speed alone, the floor of LUKS I/O: 1 MiB sequential writes
//     and reads of raw LUKS against plain raw, both on tmpfs (-memdir), the extra time
//     as a rate, for AES-256-XTS, AES-128-XTS, AES-256-CBC-ESSIV and the XTS ciphers of
//     -xts (e.g. twofish-256,serpent-256) (the kernel's AF_ALG, which `cryptsetup
//     benchmark` uses, is not what QEMU runs, and may be absent).
//
// Keys are 32 random bytes in hex, passed to qemu-img and qemu-io by fd. Usage:
//
//	go run ./test/bench/diskbench -dir /var/tmp -size 1G -rounds 3 -memdir /dev/shm
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/qemuimg"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "diskbench:", err)
		os.Exit(1)
	}
}

type bench struct {
	dir    string
	size   int64
	rounds int
	randN  int
	qi     *qemuimg.Tool
	out    io.Writer

	memdir     string // tmpfs
	cryptoSize int64
	xts        []string // more cipher-alg values for the crypto section, in XTS mode
	caches     []string // qemu-io cache modes of the I/O section
	depth      int      // queue depth of the deeper random rows
}

func run(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("diskbench", flag.ContinueOnError)
	dir := fs.String("dir", "/var/tmp", "where the images are made (a disk, not tmpfs, for I/O figures)")
	size := fs.String("size", "1G", "image size for protect and sequential I/O (K, M, G suffix)")
	rounds := fs.Int("rounds", 3, "interleaved rounds per measure (medians are reported)")
	randN := fs.Int("random", 10000, "4 KiB random requests per round")
	skip := fs.String("skip", "", "comma-separated sections to skip: unlock,protect,io,crypto")
	mem := fs.String("memdir", "/dev/shm", "a tmpfs for the crypto section (QEMU's AES-XTS without storage)")
	cryptoSize := fs.String("crypto-size", "256M", "bytes written per round in the crypto section")
	xts := fs.String("xts", "", "more LUKS cipher-alg values for the crypto section, in XTS mode, comma-separated (e.g. twofish-256,serpent-256)")
	caches := fs.String("cache", "writeback,none", "qemu-io cache modes for the I/O section, comma-separated: writeback is libvirt's default for a <disk> without cache= (QEMU's default), none is O_DIRECT; sequential rows use the first")
	depth := fs.Int("depth", 16, "queue depth of the deeper 4 KiB random rows (aio_read/aio_write, then aio_flush)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	n, err := parseSize(*size)
	if err != nil {
		return err
	}
	w, err := os.MkdirTemp(*dir, "nkp-diskbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(w)
	cn, err := parseSize(*cryptoSize)
	if err != nil {
		return err
	}
	b := &bench{dir: w, size: n, rounds: *rounds, randN: *randN, qi: &qemuimg.Tool{}, out: out, memdir: *mem, cryptoSize: cn, caches: strings.Split(*caches, ","), depth: *depth}
	if *xts != "" {
		b.xts = strings.Split(*xts, ",")
	}
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(out, "diskbench: %s, %d rounds, dir %s, load %s\n\n", *size, *rounds, *dir, strings.Join(strings.Fields(string(load))[:3], " "))
	fmt.Fprintln(out, "| measure | reference | value | candidate | value | candidate ÷ reference (time for unlock, rate otherwise) |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|")
	for _, s := range []struct {
		name string
		f    func(context.Context) error
	}{{"unlock", b.unlock}, {"protect", b.protect}, {"io", b.io}, {"crypto", b.crypto}} {
		if strings.Contains(*skip, s.name) {
			continue
		}
		if err := s.f(ctx); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	}
	var n int64
	if _, err := fmt.Sscan(s, &n); err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want a positive number with K, M or G", s)
	}
	return n * mult, nil
}

func newKey() []byte {
	var k [32]byte
	rand.Read(k[:])
	return []byte(hex.EncodeToString(k[:]))
}

// img makes a qcow2 image at name with the given LUKS settings (no key: plain qcow2).
func (b *bench) img(ctx context.Context, name string, size int64, key []byte, o qemuimg.LUKSOptions) (qemuimg.Image, error) {
	return b.imgIn(ctx, b.dir, name, qemuimg.QCOW2, size, key, o)
}

// imgIn makes an image of format f in dir: a raw format with a key is raw LUKS.
func (b *bench) imgIn(ctx context.Context, dir, name string, f qemuimg.Format, size int64, key []byte, o qemuimg.LUKSOptions) (qemuimg.Image, error) {
	if f == qemuimg.Raw && key != nil {
		f = qemuimg.LUKS
	}
	i := qemuimg.Image{Path: filepath.Join(dir, name), Format: f, Key: key}
	var err error
	for range 3 {
		// QEMU counts PBKDF iterations against the thread's CPU time, in ms; a first
		// count that took under a tick fails with "Unable to get accurate CPU usage".
		if err = b.qi.Create(ctx, qemuimg.CreateOptions{Image: i, Size: size, LUKS: o}); err == nil || !strings.Contains(err.Error(), "accurate CPU usage") {
			break
		}
		os.Remove(i.Path)
	}
	return i, err
}

// ioRun is one qemu-io run: its wall time and the CPU time and voluntary context switches
// of the whole process (all its threads).
type ioRun struct {
	wall, cpu time.Duration
	vcsw      int64
}

// qemuIO runs qemu-io on img with cmds on stdin and cache mode cache ("": qemu-io's
// default, writethrough, an fdatasync after every write, which no guest on libvirt's
// default disk gets) and returns the wall time from start to exit.
func qemuIO(ctx context.Context, img qemuimg.Image, cache, cmds string) (time.Duration, error) {
	r, err := qemuIORun(ctx, img, cache, cmds, false)
	return r.wall, err
}

// markCmd is the command qemuIORun sends first when it times the I/O alone: its
// statistics line on stdout says that qemu-io has started and opened (unlocked) the image.
const markCmd = "read 0 512\n"

// qemuIORun runs qemu-io as qemuIO does. With ioOnly, the figures start when qemu-io has
// started, opened the image and done one 512-byte read (markCmd): process start and
// unlock, which differ between the sides and are noisy, are then not in them. The CPU
// time and context switches until then are read from /proc and taken off.
func qemuIORun(ctx context.Context, img qemuimg.Image, cache, cmds string, ioOnly bool) (ioRun, error) {
	opts := "driver=" + string(img.Format) + ",file.filename=" + img.Path
	args := []string{}
	if cache != "" {
		args = append(args, "-t", cache)
	}
	var extra []*os.File
	if len(img.Key) > 0 {
		r, w, err := os.Pipe()
		if err != nil {
			return ioRun{}, err
		}
		w.Write(img.Key)
		w.Close()
		defer r.Close()
		extra = append(extra, r)
		args = append(args, "--object", "secret,id=k,file=/dev/fd/3")
		if img.Format == qemuimg.LUKS {
			opts += ",key-secret=k"
		} else {
			opts += ",encrypt.key-secret=k"
		}
	}
	args = append(args, "--image-opts", opts)
	cmd := exec.CommandContext(ctx, "qemu-io", args...)
	cmd.ExtraFiles = extra
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return ioRun{}, err
	}
	stdoutR, err := cmd.StdoutPipe()
	if err != nil {
		return ioRun{}, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return ioRun{}, err
	}
	var stdout strings.Builder
	marked := make(chan struct{})
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		buf := make([]byte, 4096)
		seen := false
		for {
			n, err := stdoutR.Read(buf)
			stdout.Write(buf[:n])
			if !seen && strings.Contains(stdout.String(), "ops;") {
				seen = true
				close(marked)
			}
			if err != nil {
				if !seen {
					close(marked)
				}
				return
			}
		}
	}()
	var cpu0 time.Duration
	var vcsw0 int64
	if ioOnly {
		io.WriteString(stdin, markCmd)
		<-marked
		start = time.Now()
		cpu0, vcsw0 = procUsage(cmd.Process.Pid)
	}
	go func() {
		io.WriteString(stdin, cmds)
		stdin.Close()
	}()
	<-copied
	err = cmd.Wait()
	d := time.Since(start)
	out := stdout.String()
	if ioOnly {
		i := strings.Index(out, "ops;")
		if i < 0 { // the mark never answered: qemu-io did not open the image
			return ioRun{}, fmt.Errorf("qemu-io on %s: not opened: %v %s %s", img.Path, err, stderr.String(), lastLines(out))
		}
		out = out[i:]
	}
	if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "rror") || stderr.Len() > 0 {
		return ioRun{}, fmt.Errorf("qemu-io on %s: %v %s %s", img.Path, err, stderr.String(), lastLines(stdout.String()))
	}
	res := ioRun{wall: d, cpu: cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime() - cpu0}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		res.vcsw = ru.Nvcsw - vcsw0
	}
	return res, nil
}

// procUsage sums the CPU time (schedstat, ns) and voluntary context switches of every
// thread of process pid so far.
func procUsage(pid int) (time.Duration, int64) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, _ := os.ReadDir(dir)
	var cpu time.Duration
	var vcsw int64
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join(dir, e.Name(), "schedstat")); err == nil {
			var ns int64
			fmt.Sscan(string(b), &ns)
			cpu += time.Duration(ns)
		}
		if b, err := os.ReadFile(filepath.Join(dir, e.Name(), "status")); err == nil {
			for _, l := range strings.Split(string(b), "\n") {
				if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
					var n int64
					fmt.Sscan(strings.TrimSpace(v), &n)
					vcsw += n
				}
			}
		}
	}
	return cpu, vcsw
}

func lastLines(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > 3 {
		l = l[len(l)-3:]
	}
	return strings.Join(l, " | ")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

func (b *bench) row(measure, ref, cand, refLabel, candLabel string, ratio float64) {
	fmt.Fprintf(b.out, "| %s | %s | %s | %s | %s | %.2f |\n", measure, refLabel, ref, candLabel, cand, ratio)
}

// interleave runs each of fs once per round, the order rotating, and returns their
// results (times, or qemu-io runs with their CPU time).
func interleave[T any](ctx context.Context, rounds int, fs ...func(context.Context) (T, error)) ([][]T, error) {
	res := make([][]T, len(fs))
	for r := 0; r < rounds; r++ {
		for k := range fs {
			i := (k + r) % len(fs)
			d, err := fs[i](ctx)
			if err != nil {
				return nil, err
			}
			res[i] = append(res[i], d)
		}
	}
	return res, nil
}

// medianRun is the median of each of a run's figures, taken separately.
func medianRun(rs []ioRun) ioRun {
	var w, c []time.Duration
	var v []int64
	for _, r := range rs {
		w, c, v = append(w, r.wall), append(c, r.cpu), append(v, r.vcsw)
	}
	slices.Sort(v)
	return ioRun{wall: median(w), cpu: median(c), vcsw: v[len(v)/2]}
}

func (b *bench) unlock(ctx context.Context) error {
	plain, err := b.img(ctx, "u-plain.qcow2", 64<<20, nil, qemuimg.LUKSOptions{})
	if err != nil {
		return err
	}
	plain2, err := b.img(ctx, "u-plain2.qcow2", 64<<20, nil, qemuimg.LUKSOptions{})
	if err != nil {
		return err
	}
	nkp, err := b.img(ctx, "u-nkp.qcow2", 64<<20, newKey(), qemuimg.LUKSOptions{})
	if err != nil {
		return err
	}
	def, err := b.img(ctx, "u-default.qcow2", 64<<20, newKey(), qemuimg.LUKSOptions{IterTime: 2 * time.Second})
	if err != nil {
		return err
	}
	rawPlain, err := b.imgIn(ctx, b.dir, "u-plain.raw", qemuimg.Raw, 64<<20, nil, qemuimg.LUKSOptions{})
	if err != nil {
		return err
	}
	rawNKP, err := b.imgIn(ctx, b.dir, "u-nkp.luks", qemuimg.Raw, 64<<20, newKey(), qemuimg.LUKSOptions{})
	if err != nil {
		return err
	}
	open := func(i qemuimg.Image) func(context.Context) (time.Duration, error) {
		return func(ctx context.Context) (time.Duration, error) { return qemuIO(ctx, i, "", "read 0 4k\n") }
	}
	t, err := interleave(ctx, max(b.rounds, 5), open(plain), open(plain2), open(nkp), open(def), open(rawPlain), open(rawNKP))
	if err != nil {
		return err
	}
	p, p2, n, d, rp, rn := median(t[0]), median(t[1]), median(t[2]), median(t[3]), median(t[4]), median(t[5])
	b.row("open + 4 KiB read, calibration", ms(p2), ms(p), "plain qcow2", "plain qcow2 (2nd)", float64(p2)/float64(p))
	b.row("unlock per disk (open − plain open), LUKS in qcow2", ms(d-p), ms(n-p), "QEMU default (2 s iter-time)", "nkp (1 ms iter-time)", float64(n-p)/float64(d-p))
	b.row("unlock per disk (open − plain raw open), raw LUKS", ms(d-p), ms(rn-rp), "QEMU default, qcow2 (above)", "nkp (1 ms iter-time)", float64(rn-rp)/float64(d-p))
	fmt.Fprintf(b.out, "|  … target: nkp's unlock ≤ 20 ms per disk | | | | %s and %s | %s |\n", ms(n-p), ms(rn-rp), verdict(n-p <= 20*time.Millisecond && rn-rp <= 20*time.Millisecond))
	return nil
}

func (b *bench) protect(ctx context.Context) error {
	src := qemuimg.Image{Path: filepath.Join(b.dir, "p-src.raw"), Format: qemuimg.Raw}
	if err := b.qi.Create(ctx, qemuimg.CreateOptions{Image: src, Size: b.size}); err != nil {
		return err
	}
	// Fill with non-zero data (qemu-img skips zeros): 1 MiB requests.
	cmds := fmt.Sprintf("write -P 0x5a 0 %d\n", b.size)
	cmd := exec.CommandContext(ctx, "qemu-io", "-f", "raw", "-c", strings.TrimSpace(cmds), src.Path)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("filling %s: %v %s", src.Path, err, out)
	}
	plainConv := func(name string) func(context.Context) (time.Duration, error) {
		return func(ctx context.Context) (time.Duration, error) {
			dst := filepath.Join(b.dir, name)
			os.Remove(dst)
			start := time.Now()
			out, err := exec.CommandContext(ctx, "qemu-img", "convert", "-O", "qcow2", "-f", "raw", src.Path, dst).CombinedOutput()
			if err != nil {
				return 0, fmt.Errorf("qemu-img convert: %v %s", err, out)
			}
			d := time.Since(start)
			os.Remove(dst)
			return d, nil
		}
	}
	nkpConv := func(ctx context.Context) (time.Duration, error) {
		dst := qemuimg.Image{Path: filepath.Join(b.dir, "p-nkp.qcow2"), Format: qemuimg.QCOW2, Key: newKey()}
		os.Remove(dst.Path)
		start := time.Now()
		if err := b.qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst}); err != nil {
			return 0, err
		}
		d := time.Since(start)
		os.Remove(dst.Path)
		return d, nil
	}
	// What protect does per disk: the convert, then a compare of the new image (through
	// its key) with the source before the domain switches to it.
	nkpProtect := func(ctx context.Context) (time.Duration, error) {
		dst := qemuimg.Image{Path: filepath.Join(b.dir, "p-nkp2.qcow2"), Format: qemuimg.QCOW2, Key: newKey()}
		os.Remove(dst.Path)
		start := time.Now()
		if err := b.qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst}); err != nil {
			return 0, err
		}
		if err := b.qi.Compare(ctx, src, dst); err != nil {
			return 0, err
		}
		d := time.Since(start)
		os.Remove(dst.Path)
		return d, nil
	}
	t, err := interleave(ctx, b.rounds, plainConv("p-plain.qcow2"), plainConv("p-plain2.qcow2"), nkpConv, nkpProtect)
	if err != nil {
		return err
	}
	gib := float64(b.size) / (1 << 30)
	rate := func(d time.Duration) string { return fmt.Sprintf("%.0f MiB/s", gib*1024/d.Seconds()) }
	p, p2, n, np := median(t[0]), median(t[1]), median(t[2]), median(t[3])
	b.row("protect throughput, calibration", rate(p), rate(p2), "qemu-img convert", "qemu-img convert (2nd)", p.Seconds()/p2.Seconds())
	b.row("protect throughput", rate(p), rate(n), "qemu-img convert (plain)", "nkp qemuimg.Convert (LUKS)", p.Seconds()/n.Seconds())
	b.row("protect throughput, convert + compare", rate(p), rate(np), "qemu-img convert (plain)", "nkp Convert + Compare (LUKS)", p.Seconds()/np.Seconds())
	return nil
}

// ioSide is one image of the I/O section and the side it is compared with.
type ioSide struct {
	label string
	img   qemuimg.Image
	ref   int
}

func (b *bench) io(ctx context.Context) error {
	var sides []ioSide
	for _, s := range []struct {
		label, name string
		f           qemuimg.Format
		key         []byte
		o           qemuimg.LUKSOptions
		ref         int
	}{
		{"plain qcow2", "io-plain.qcow2", qemuimg.QCOW2, nil, qemuimg.LUKSOptions{}, 0},
		{"plain qcow2 (2nd)", "io-plain2.qcow2", qemuimg.QCOW2, nil, qemuimg.LUKSOptions{}, 0},
		{"LUKS in qcow2, " + cipherLabel("aes-256"), "io-a256.qcow2", qemuimg.QCOW2, newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-256"}, 0},
		{"LUKS in qcow2, " + cipherLabel("aes-128"), "io-a128.qcow2", qemuimg.QCOW2, newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-128"}, 0},
		{"plain raw", "io-plain.raw", qemuimg.Raw, nil, qemuimg.LUKSOptions{}, 4},
		{"raw LUKS, " + cipherLabel("aes-256"), "io-a256.luks", qemuimg.Raw, newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-256"}, 4},
		{"raw LUKS, " + cipherLabel("aes-128"), "io-a128.luks", qemuimg.Raw, newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-128"}, 4},
	} {
		i, err := b.imgIn(ctx, b.dir, s.name, s.f, b.size, s.key, s.o)
		if err != nil {
			return err
		}
		sides = append(sides, ioSide{s.label, i, s.ref})
	}
	blocks := b.size / 4096
	// randCmds: n 4 KiB requests at random offsets, depth at a time: depth 1 is one
	// synchronous read or write after another (what the first figures of this bench
	// were); deeper is depth aio_read/aio_write in flight, then aio_flush (qemu-io's drain:
	// it waits for them, it issues no flush), as a guest with a queue does.
	randCmds := func(op string, depth int, seed uint64) string {
		r := mrand.New(mrand.NewPCG(seed, 1))
		var sb strings.Builder
		for i := 0; i < b.randN; i++ {
			cmd := op
			if depth > 1 {
				cmd = "aio_" + op
			}
			if op == "write" {
				fmt.Fprintf(&sb, "%s -q -P 0x%02x %d 4k\n", cmd, 1+r.IntN(250), r.Int64N(blocks)*4096)
			} else {
				fmt.Fprintf(&sb, "%s -q %d 4k\n", cmd, r.Int64N(blocks)*4096)
			}
			if depth > 1 && (i+1)%depth == 0 {
				sb.WriteString("aio_flush\n")
			}
		}
		if depth > 1 {
			sb.WriteString("aio_flush\n")
		}
		if op == "write" {
			sb.WriteString("flush\n") // once, as a guest's fsync would: the same on both sides
		}
		return sb.String()
	}
	var seq, seqR strings.Builder
	for off := int64(0); off < b.size; off += 1 << 20 {
		fmt.Fprintf(&seq, "write -q -P 0x33 %d 1M\n", off)
		fmt.Fprintf(&seqR, "read -q %d 1M\n", off)
	}
	seq.WriteString("flush\n")
	type work struct {
		name, cmds string
		per        float64 // MiB or requests per run, for the rate
		unit       string
	}
	for ci, cache := range b.caches {
		var works []work
		if ci == 0 {
			works = append(works,
				work{"1 MiB sequential write", seq.String(), float64(b.size) / (1 << 20), "MiB/s"},
				work{"1 MiB sequential read", seqR.String(), float64(b.size) / (1 << 20), "MiB/s"})
		}
		for _, d := range []int{1, b.depth} {
			works = append(works,
				work{fmt.Sprintf("4 KiB random write, QD%d", d), randCmds("write", d, 7), float64(b.randN), "req/s"},
				work{fmt.Sprintf("4 KiB random read, QD%d", d), randCmds("read", d, 9), float64(b.randN), "req/s"})
		}
		for _, w := range works {
			t, err := b.runSides(ctx, sides, cache, w.cmds)
			if err != nil {
				return err
			}
			per := func(r ioRun) string {
				n := float64(b.randN)
				return fmt.Sprintf("%.1f µs, %.1f µs CPU, %.1f ctx sw", float64(r.wall.Microseconds())/n, float64(r.cpu.Microseconds())/n, float64(r.vcsw)/n)
			}
			b.compare(w.name+", cache="+cache, sides, t, w.per, w.unit, func(k, ref int) {
				if w.unit == "req/s" {
					fmt.Fprintf(b.out, "|  … per request | %s | %s | %s | %s | |\n", sides[ref].label, per(t[ref]), sides[k].label, per(t[k]))
				} else if extra := t[k].wall - t[ref].wall; extra > 0 {
					// What encryption itself costs: the extra time, as a rate.
					fmt.Fprintf(b.out, "|  … crypto cost of %s, %s | | %.0f MiB/s of extra time | | | |\n", sides[k].label, w.name, w.per/extra.Seconds())
				}
			})
		}
	}
	return nil
}

// compare writes the rows of one measure: the calibration (side 0 against side 1), then
// every other side against its reference, each followed by what more writes. per is the
// MiB or requests of one run, for the rate in unit.
func (b *bench) compare(name string, sides []ioSide, t []ioRun, per float64, unit string, more func(k, ref int)) {
	rate := func(d time.Duration) string { return fmt.Sprintf("%.0f %s", per/d.Seconds(), unit) }
	b.row(name+", calibration", rate(t[0].wall), rate(t[1].wall), sides[0].label, sides[1].label, t[0].wall.Seconds()/t[1].wall.Seconds())
	for k := 2; k < len(sides); k++ {
		ref := sides[k].ref
		if ref == k {
			continue // a reference itself
		}
		b.row(name, rate(t[ref].wall), rate(t[k].wall), sides[ref].label, sides[k].label, t[ref].wall.Seconds()/t[k].wall.Seconds())
		more(k, ref)
	}
}

// cipherLabel names an XTS cipher and says whether it is nkp's default.
func cipherLabel(alg string) string {
	l := alg + "-xts"
	if alg == qemuimg.DefaultCipherAlg {
		l += " (nkp's)"
	}
	return l
}

// runSides runs cmds on every side, interleaved, and returns each side's medians.
func (b *bench) runSides(ctx context.Context, sides []ioSide, cache, cmds string) ([]ioRun, error) {
	var fs []func(context.Context) (ioRun, error)
	for _, s := range sides {
		fs = append(fs, func(ctx context.Context) (ioRun, error) { return qemuIORun(ctx, s.img, cache, cmds, true) })
	}
	t, err := interleave(ctx, b.rounds, fs...)
	if err != nil {
		return nil, err
	}
	res := make([]ioRun, len(t))
	for i := range t {
		res[i] = medianRun(t[i])
	}
	return res, nil
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// crypto measures the floor that LUKS I/O cannot beat: QEMU's own cipher speed, as the
// extra time of 1 MiB sequential writes and reads on a raw LUKS image over a plain raw
// image, both on tmpfs (no storage in the way), single-threaded as qemu-io and QEMU's
// block layer encrypt. The rows above are then judged against this rate. Besides the
// two XTS key sizes nkp may choose, AES-CBC with ESSIV IVs (LUKS1's old default) is
// measured, because its decryption is parallel where XTS's is not in QEMU's crypto: the
// package doc of qemuimg says why nkp does not take it anyway.
func (b *bench) crypto(ctx context.Context) error {
	w, err := os.MkdirTemp(b.memdir, "nkp-diskbench-")
	if err != nil {
		return fmt.Errorf("-memdir: %w", err)
	}
	defer os.RemoveAll(w)
	type cside struct {
		label string
		key   []byte
		o     qemuimg.LUKSOptions
	}
	cs := []cside{
		{"plain raw on tmpfs", nil, qemuimg.LUKSOptions{}},
		{"plain raw on tmpfs (2nd)", nil, qemuimg.LUKSOptions{}},
		{"raw LUKS aes-256-xts-plain64 on tmpfs", newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-256"}},
		{"raw LUKS aes-128-xts-plain64 on tmpfs", newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-128"}},
		{"raw LUKS aes-256-cbc-essiv on tmpfs", newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-256", CipherMode: "cbc", IVGenAlg: "essiv"}},
	}
	for _, alg := range b.xts {
		cs = append(cs, cside{"raw LUKS " + alg + "-xts-plain64 on tmpfs", newKey(), qemuimg.LUKSOptions{CipherAlg: alg}})
	}
	var sides []ioSide
	for i, s := range cs {
		img, err := b.imgIn(ctx, w, fmt.Sprintf("c-%d.img", i), qemuimg.Raw, b.cryptoSize, s.key, s.o)
		if err != nil {
			return err
		}
		sides = append(sides, ioSide{s.label, img, 0})
	}
	var seq, seqR strings.Builder
	for off := int64(0); off < b.cryptoSize; off += 1 << 20 {
		fmt.Fprintf(&seq, "write -q -P 0x77 %d 1M\n", off)
		fmt.Fprintf(&seqR, "read -q %d 1M\n", off)
	}
	mib := float64(b.cryptoSize) / (1 << 20)
	for _, op := range []struct{ name, cmds string }{{"write", seq.String()}, {"read", seqR.String()}} {
		t, err := b.runSides(ctx, sides, "writeback", op.cmds)
		if err != nil {
			return err
		}
		b.compare("1 MiB sequential "+op.name+" on tmpfs", sides, t, mib, "MiB/s", func(k, ref int) {
			if extra := t[k].wall - t[ref].wall; extra > 0 {
				fmt.Fprintf(b.out, "|  … QEMU's %s alone, %s (the floor of LUKS I/O) | | | | %.0f MiB/s, %.1f µs per 4 KiB | |\n", strings.TrimSuffix(strings.TrimPrefix(sides[k].label, "raw LUKS "), " on tmpfs"), op.name, mib/extra.Seconds(), extra.Seconds()*1e6/(mib*256))
			}
		})
	}
	return nil
}
