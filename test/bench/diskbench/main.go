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
//   - I/O with qemu-io: 1 MiB sequential writes and reads, and 4 KiB random reads and
//     writes, on LUKS-in-qcow2 (AES-256-XTS, QEMU's default, and AES-128-XTS) against
//     plain qcow2 of the same size, and raw LUKS against plain raw;
//   - crypto: QEMU's AES-XTS speed alone, the floor of LUKS I/O: 1 MiB sequential writes
//     to raw LUKS against plain raw, both on tmpfs (-memdir), the extra time as a rate
//     (the kernel's AF_ALG, which `cryptsetup benchmark` uses, is not what QEMU runs,
//     and may be absent).
//
// Keys are 32 random bytes in hex, passed to qemu-img and qemu-io by fd. Usage:
//
//	go run ./test/bench/diskbench -dir /var/tmp -size 1G -rounds 3
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
}

func run(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("diskbench", flag.ContinueOnError)
	dir := fs.String("dir", "/var/tmp", "where the images are made (a disk, not tmpfs, for I/O figures)")
	size := fs.String("size", "1G", "image size for protect and sequential I/O (K, M, G suffix)")
	rounds := fs.Int("rounds", 3, "interleaved rounds per measure (medians are reported)")
	randN := fs.Int("random", 4000, "4 KiB random requests per round")
	skip := fs.String("skip", "", "comma-separated sections to skip: unlock,protect,io,crypto")
	mem := fs.String("memdir", "/dev/shm", "a tmpfs for the crypto section (QEMU's AES-XTS without storage)")
	cryptoSize := fs.String("crypto-size", "256M", "bytes written per round in the crypto section")
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
	b := &bench{dir: w, size: n, rounds: *rounds, randN: *randN, qi: &qemuimg.Tool{}, out: out, memdir: *mem, cryptoSize: cn}
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

// qemuIO runs qemu-io on img with cmds on stdin and returns the wall time.
func qemuIO(ctx context.Context, img qemuimg.Image, cmds string) (time.Duration, error) {
	opts := "driver=" + string(img.Format) + ",file.filename=" + img.Path
	args := []string{}
	var extra []*os.File
	if len(img.Key) > 0 {
		r, w, err := os.Pipe()
		if err != nil {
			return 0, err
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
	cmd.Stdin = strings.NewReader(cmds)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil || strings.Contains(stdout.String(), "failed") || stderr.Len() > 0 {
		return 0, fmt.Errorf("qemu-io on %s: %v %s %s", img.Path, err, stderr.String(), lastLines(stdout.String()))
	}
	return d, nil
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

// interleave runs each of fs once per round, the order rotating, and returns their times.
func (b *bench) interleave(ctx context.Context, fs ...func(context.Context) (time.Duration, error)) ([][]time.Duration, error) {
	res := make([][]time.Duration, len(fs))
	for r := 0; r < b.rounds; r++ {
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
		return func(ctx context.Context) (time.Duration, error) { return qemuIO(ctx, i, "read 0 4k\n") }
	}
	saved := b.rounds
	b.rounds = max(b.rounds, 5)
	t, err := b.interleave(ctx, open(plain), open(plain2), open(nkp), open(def), open(rawPlain), open(rawNKP))
	b.rounds = saved
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
	t, err := b.interleave(ctx, plainConv("p-plain.qcow2"), plainConv("p-plain2.qcow2"), nkpConv, nkpProtect)
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

func (b *bench) io(ctx context.Context) error {
	type side struct {
		label string
		img   qemuimg.Image
		ref   int // the side this one is compared with
	}
	var sides []side
	for _, s := range []struct {
		label, name string
		f           qemuimg.Format
		key         []byte
		o           qemuimg.LUKSOptions
		ref         int
	}{
		{"plain qcow2", "io-plain.qcow2", qemuimg.QCOW2, nil, qemuimg.LUKSOptions{}, 0},
		{"plain qcow2 (2nd)", "io-plain2.qcow2", qemuimg.QCOW2, nil, qemuimg.LUKSOptions{}, 0},
		{"LUKS in qcow2, aes-256-xts", "io-a256.qcow2", qemuimg.QCOW2, newKey(), qemuimg.LUKSOptions{}, 0},
		{"LUKS in qcow2, aes-128-xts", "io-a128.qcow2", qemuimg.QCOW2, newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-128"}, 0},
		{"plain raw", "io-plain.raw", qemuimg.Raw, nil, qemuimg.LUKSOptions{}, 4},
		{"raw LUKS, aes-256-xts", "io-a256.luks", qemuimg.Raw, newKey(), qemuimg.LUKSOptions{}, 4},
	} {
		i, err := b.imgIn(ctx, b.dir, s.name, s.f, b.size, s.key, s.o)
		if err != nil {
			return err
		}
		sides = append(sides, side{s.label, i, s.ref})
	}
	blocks := b.size / 4096
	randCmds := func(op string, seed uint64) string {
		r := mrand.New(mrand.NewPCG(seed, 1))
		var sb strings.Builder
		for i := 0; i < b.randN; i++ {
			if op == "write" {
				fmt.Fprintf(&sb, "write -P 0x%02x %d 4k\n", 1+r.IntN(250), r.Int64N(blocks)*4096)
			} else {
				fmt.Fprintf(&sb, "read %d 4k\n", r.Int64N(blocks)*4096)
			}
		}
		return sb.String()
	}
	var seq strings.Builder
	for off := int64(0); off < b.size; off += 1 << 20 {
		fmt.Fprintf(&seq, "write -P 0x33 %d 1M\n", off)
	}
	var seqR strings.Builder
	for off := int64(0); off < b.size; off += 1 << 20 {
		fmt.Fprintf(&seqR, "read %d 1M\n", off)
	}
	work := []struct {
		name, cmds string
		per        float64 // bytes or requests per run, for the rate
		unit       string
	}{
		{"1 MiB sequential write", seq.String(), float64(b.size) / (1 << 20), "MiB/s"},
		{"1 MiB sequential read", seqR.String(), float64(b.size) / (1 << 20), "MiB/s"},
		{"4 KiB random write", randCmds("write", 7), float64(b.randN), "req/s"},
		{"4 KiB random read", randCmds("read", 9), float64(b.randN), "req/s"},
	}
	for _, w := range work {
		var fs []func(context.Context) (time.Duration, error)
		for _, s := range sides {
			fs = append(fs, func(ctx context.Context) (time.Duration, error) { return qemuIO(ctx, s.img, w.cmds) })
		}
		t, err := b.interleave(ctx, fs...)
		if err != nil {
			return err
		}
		rate := func(d time.Duration) string { return fmt.Sprintf("%.0f %s", w.per/d.Seconds(), w.unit) }
		base := median(t[0])
		b.row(w.name+", calibration", rate(base), rate(median(t[1])), sides[0].label, sides[1].label, base.Seconds()/median(t[1]).Seconds())
		for k := 2; k < len(sides); k++ {
			if sides[k].ref == k {
				continue // a reference itself
			}
			ref, m := median(t[sides[k].ref]), median(t[k])
			b.row(w.name, rate(ref), rate(m), sides[sides[k].ref].label, sides[k].label, ref.Seconds()/m.Seconds())
		}
		if w.unit == "MiB/s" {
			// What encryption itself costs: the extra time per GiB, as a rate.
			for k := 2; k < len(sides); k++ {
				if sides[k].ref == k {
					continue
				}
				extra := median(t[k]) - median(t[sides[k].ref])
				if extra > 0 {
					fmt.Fprintf(b.out, "|  … crypto cost of %s, %s | | %.0f MiB/s of extra time | | | |\n", sides[k].label, w.name, float64(b.size)/(1<<20)/extra.Seconds())
				}
			}
		}
	}
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// crypto measures the floor that LUKS I/O cannot beat: QEMU's own AES-XTS speed, as the
// extra time of 1 MiB sequential writes to a raw LUKS image over a plain raw image, both
// on tmpfs (no storage in the way), single-threaded as qemu-io and QEMU's block layer
// encrypt. The rows above are then judged against this rate.
func (b *bench) crypto(ctx context.Context) error {
	w, err := os.MkdirTemp(b.memdir, "nkp-diskbench-")
	if err != nil {
		return fmt.Errorf("-memdir: %w", err)
	}
	defer os.RemoveAll(w)
	sides := []struct {
		label string
		key   []byte
		o     qemuimg.LUKSOptions
	}{
		{"plain raw on tmpfs", nil, qemuimg.LUKSOptions{}},
		{"plain raw on tmpfs (2nd)", nil, qemuimg.LUKSOptions{}},
		{"raw LUKS aes-256-xts on tmpfs", newKey(), qemuimg.LUKSOptions{}},
		{"raw LUKS aes-128-xts on tmpfs", newKey(), qemuimg.LUKSOptions{CipherAlg: "aes-128"}},
	}
	var seq strings.Builder
	for off := int64(0); off < b.cryptoSize; off += 1 << 20 {
		fmt.Fprintf(&seq, "write -P 0x77 %d 1M\n", off)
	}
	var fs []func(context.Context) (time.Duration, error)
	for i, s := range sides {
		img, err := b.imgIn(ctx, w, fmt.Sprintf("c-%d.img", i), qemuimg.Raw, b.cryptoSize, s.key, s.o)
		if err != nil {
			return err
		}
		fs = append(fs, func(ctx context.Context) (time.Duration, error) { return qemuIO(ctx, img, seq.String()) })
	}
	t, err := b.interleave(ctx, fs...)
	if err != nil {
		return err
	}
	mib := float64(b.cryptoSize) / (1 << 20)
	rate := func(d time.Duration) string { return fmt.Sprintf("%.0f MiB/s", mib/d.Seconds()) }
	base := median(t[0])
	b.row("1 MiB sequential write on tmpfs, calibration", rate(base), rate(median(t[1])), sides[0].label, sides[1].label, base.Seconds()/median(t[1]).Seconds())
	for k := 2; k < len(sides); k++ {
		m := median(t[k])
		b.row("1 MiB sequential write on tmpfs", rate(base), rate(m), sides[0].label, sides[k].label, base.Seconds()/m.Seconds())
		if extra := m - base; extra > 0 {
			fmt.Fprintf(b.out, "|  … QEMU's %s alone (the floor of LUKS I/O) | | | | %.0f MiB/s | |\n", strings.TrimSuffix(strings.TrimPrefix(sides[k].label, "raw LUKS "), " on tmpfs"), mib/extra.Seconds())
		}
	}
	return nil
}
