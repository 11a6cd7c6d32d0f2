package qemuimg

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// CreateOptions describe a new image.
type CreateOptions struct {
	// Image is the new file, its format, and its key (nil for a plain image).
	Image Image
	// Size is the virtual size in bytes; zero takes the backing file's.
	Size int64
	// Backing, if set, is the backing file (opened with its own format and key).
	Backing *Image
	// LUKS are the settings of an encrypted image.
	LUKS LUKSOptions
}

// Create makes a new image. It refuses to overwrite an existing file only as far as
// qemu-img does (it truncates): callers create under a temporary name and rename.
func (t *Tool) Create(ctx context.Context, o CreateOptions) error {
	if err := o.Image.check(); err != nil {
		return err
	}
	if o.Size < 0 || (o.Size == 0 && o.Backing == nil) {
		return fmt.Errorf("image %s: size %d: give a positive size in bytes", o.Image.Path, o.Size)
	}
	if o.Backing != nil {
		if err := o.Backing.check(); err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		if o.Image.Format != QCOW2 {
			return fmt.Errorf("image %s: only qcow2 has a backing file", o.Image.Path)
		}
		if len(o.Backing.Key) > 0 {
			return fmt.Errorf("image %s: an encrypted backing file is not supported: convert the chain into one image", o.Image.Path)
		}
	}
	sec := &secrets{}
	args := []string{"-q", "-f", string(o.Image.Format)}
	var opts []string
	if len(o.Image.Key) > 0 {
		opts = append(opts, o.LUKS.createOpts(o.Image.Format, sec.add(o.Image.Key))...)
	}
	if o.Backing != nil {
		// The backing file is named by its path; its format is given so it is not probed.
		opts = append(opts, "backing_file="+escape(o.Backing.Path), "backing_fmt="+string(o.Backing.Format))
	}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	args = append(args, o.Image.Path)
	if o.Size > 0 {
		args = append(args, strconv.FormatInt(o.Size, 10))
	}
	_, err := t.run(ctx, call{op: "create", image: o.Image.Path, args: args, sec: sec})
	return err
}

// ConvertOptions describe a copy of one image (with its whole backing chain) into a new
// one.
type ConvertOptions struct {
	// Src is read through its backing chain: the new image stands alone.
	Src Image
	// Dst is created; give a key to make it encrypted.
	Dst Image
	// LUKS are the settings of an encrypted Dst.
	LUKS LUKSOptions
	// Progress, if set, is called with the fraction done (0 to 1) as it grows.
	Progress func(done float64)
	// Coroutines is qemu-img's -m (parallel requests; 0 means qemu-img's default, 8).
	Coroutines int
	// OutOfOrder allows qemu-img's -W (writes out of order: faster, and safe because the
	// new image is only used after the whole copy is verified).
	OutOfOrder bool
}

// Convert copies Src into a new image Dst (created; an existing file is overwritten, so
// callers write under a temporary name and rename after verifying).
func (t *Tool) Convert(ctx context.Context, o ConvertOptions) error {
	if err := o.Src.check(); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if err := o.Dst.check(); err != nil {
		return fmt.Errorf("target: %w", err)
	}
	if o.Src.Path == o.Dst.Path {
		return fmt.Errorf("image %s: source and target are the same file", o.Src.Path)
	}
	sec := &secrets{}
	srcID := sec.addIf(o.Src.Key)
	args := []string{"--image-opts"}
	if o.Progress != nil {
		args = append(args, "-p")
	} else {
		args = append(args, "-q")
	}
	if o.Coroutines > 0 {
		args = append(args, "-m", strconv.Itoa(o.Coroutines))
	}
	if o.OutOfOrder {
		args = append(args, "-W")
	}
	args = append(args, "-O", string(o.Dst.Format))
	if len(o.Dst.Key) > 0 {
		id := sec.add(o.Dst.Key)
		args = append(args, "-o", strings.Join(o.LUKS.createOpts(o.Dst.Format, id), ","))
	}
	args = append(args, o.Src.imageOpts(srcID), o.Dst.Path)
	_, err := t.run(ctx, call{op: "convert", image: o.Src.Path + " -> " + o.Dst.Path, args: args, sec: sec, progress: o.Progress})
	if err == nil && o.Progress != nil {
		o.Progress(1)
	}
	return err
}

// Compare reports whether two images hold the same guest-visible data (each read through
// its own key and backing chain). A difference is an *Error of kind ErrDiffer that says
// where. As qemu-img compare without -s, an image larger than the other compares equal
// when its extra part reads as zeros, and allocation is not compared (a converted image
// is allocated differently from its source).
func (t *Tool) Compare(ctx context.Context, a, b Image) error {
	if err := a.check(); err != nil {
		return err
	}
	if err := b.check(); err != nil {
		return err
	}
	sec := &secrets{}
	ida, idb := sec.addIf(a.Key), sec.addIf(b.Key)
	res, err := t.run(ctx, call{op: "compare", image: a.Path + " and " + b.Path, sec: sec,
		args: []string{"--image-opts", a.imageOpts(ida), b.imageOpts(idb)}}, 1)
	if err == nil && res.code == 1 {
		// Exit 1 is "the images differ"; qemu-img says where on stdout.
		err = &Error{Op: "compare", Image: a.Path + " and " + b.Path, Kind: ErrDiffer, Code: 1, Detail: lastLine(string(res.stdout))}
	}
	return err
}

// AddKey adds a keyslot for newKey to an encrypted image opened with img.Key. The old
// keyslot stays: a crash between AddKey and RemoveKey leaves an image that both keys open.
func (t *Tool) AddKey(ctx context.Context, img Image, newKey []byte, o LUKSOptions) error {
	if err := img.check(); err != nil {
		return err
	}
	if len(img.Key) == 0 || len(newKey) == 0 {
		return fmt.Errorf("image %s: adding a keyslot needs the current key and the new one", img.Path)
	}
	p := img.amendPrefix()
	return t.amend(ctx, img, newKey, func(cur, other string) []string {
		return []string{p + "state=active", p + "new-secret=" + other, fmt.Sprintf("%siter-time=%d", p, o.iterMillis())}
	})
}

// RemoveKey erases every keyslot that oldKey opens, opening the image with img.Key (which
// must open another keyslot, so the image never ends up with none).
func (t *Tool) RemoveKey(ctx context.Context, img Image, oldKey []byte) error {
	if err := img.check(); err != nil {
		return err
	}
	if len(img.Key) == 0 || len(oldKey) == 0 {
		return fmt.Errorf("image %s: removing a keyslot needs the key that stays and the one to remove", img.Path)
	}
	p := img.amendPrefix()
	return t.amend(ctx, img, oldKey, func(cur, other string) []string {
		return []string{p + "state=inactive", p + "old-secret=" + other}
	})
}

func (img Image) amendPrefix() string {
	if img.Format == LUKS {
		return ""
	}
	return "encrypt."
}

func (t *Tool) amend(ctx context.Context, img Image, otherKey []byte, opts func(cur, other string) []string) error {
	sec := &secrets{}
	cur := sec.add(img.Key)
	other := sec.add(otherKey)
	_, err := t.run(ctx, call{op: "amend", image: img.Path, sec: sec,
		args: []string{"-q", "--image-opts", "-o", strings.Join(opts(cur, other), ","), img.imageOpts(cur)}})
	return err
}

// Check runs qemu-img check (read-only) and returns its report. Corruptions are returned
// as an *Error of kind ErrCorrupt together with the report; leaks are only reported.
func (t *Tool) Check(ctx context.Context, img Image) (*CheckReport, error) {
	if err := img.check(); err != nil {
		return nil, err
	}
	if img.Format == Raw || img.Format == LUKS {
		return nil, fmt.Errorf("image %s: qemu-img checks only qcow2 images (format %s has no metadata to check)", img.Path, img.Format)
	}
	sec := &secrets{}
	id := sec.addIf(img.Key)
	// Exit 2: corruptions, 3: leaks only; both still print the report.
	res, err := t.run(ctx, call{op: "check", image: img.Path, sec: sec,
		args: []string{"--output=json", "--image-opts", img.imageOpts(id)}}, 2, 3)
	if err != nil {
		return nil, err
	}
	rep, perr := ParseCheck(res.stdout)
	if perr != nil {
		return nil, fmt.Errorf("qemu-img check %s: %w", img.Path, perr)
	}
	if rep.Corruptions > 0 || res.code == 2 {
		return rep, &Error{Op: "check", Image: img.Path, Kind: ErrCorrupt, Code: res.code,
			Detail: fmt.Sprintf("%d corruptions, %d leaks", rep.Corruptions, rep.Leaks)}
	}
	return rep, nil
}

// Info returns what qemu-img knows of one image (no backing chain). The key is optional:
// without it the LUKS header is still shown.
func (t *Tool) Info(ctx context.Context, img Image) (*Info, error) {
	chain, err := t.info(ctx, img, false)
	if err != nil {
		return nil, err
	}
	return &chain[0], nil
}

// Chain returns the image and every backing file below it, top first.
func (t *Tool) Chain(ctx context.Context, img Image) ([]Info, error) {
	return t.info(ctx, img, true)
}

func (t *Tool) info(ctx context.Context, img Image, chain bool) ([]Info, error) {
	if err := img.check(); err != nil {
		return nil, err
	}
	sec := &secrets{}
	id := sec.addIf(img.Key)
	args := []string{"--output=json", "--image-opts"}
	if chain {
		args = append(args, "--backing-chain")
	}
	args = append(args, img.imageOpts(id))
	res, err := t.run(ctx, call{op: "info", image: img.Path, sec: sec, args: args})
	if err != nil {
		return nil, err
	}
	var infos []Info
	if chain {
		infos, err = ParseChain(res.stdout)
	} else {
		var i *Info
		if i, err = ParseInfo(res.stdout); err == nil {
			infos = []Info{*i}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("qemu-img info %s: %w", img.Path, err)
	}
	if len(infos) == 0 {
		return nil, errors.New("qemu-img info " + img.Path + ": no image in the output")
	}
	return infos, nil
}

// Measurement is what `qemu-img measure` says a converted image needs.
type Measurement struct {
	// Required is the file size the new image needs for the source's data.
	Required int64 `json:"required"`
	// FullyAllocated is its size were every cluster allocated.
	FullyAllocated int64 `json:"fully-allocated"`
}

// ParseMeasure reads the JSON of `qemu-img measure --output=json`.
func ParseMeasure(b []byte) (*Measurement, error) {
	if len(b) > maxJSON {
		return nil, fmt.Errorf("image measure: %d bytes is more than the %d a report can be", len(b), maxJSON)
	}
	var m Measurement
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("image measure: not qemu-img's JSON: %w", err)
	}
	if m.Required <= 0 || m.FullyAllocated < 0 {
		return nil, fmt.Errorf("image measure: required %d, fully allocated %d: not a measurement", m.Required, m.FullyAllocated)
	}
	return &m, nil
}

// LUKSHeaderSpace bounds what a LUKS header adds to an image: the 592-byte header in
// its 4 KiB sector and eight keyslots of 4,000 anti-forensic stripes of the master key
// (64 bytes for AES-256-XTS), each 4 KiB-aligned — 2,068,480 bytes for a raw LUKS image
// with QEMU's defaults, 2 MiB inside qcow2 (whole 64 KiB clusters) — plus one cluster of
// slack for qcow2's metadata of the header's clusters.
const LUKSHeaderSpace = 2<<20 + 64<<10

// Measure says how much space Convert of src (through its backing chain) into a new
// image of format dst needs; dstKey set measures an encrypted target (LUKS inside qcow2,
// or raw LUKS; o does not change the figure: LUKSHeaderSpace bounds every cipher).
// Callers compare it with the target filesystem's free space before converting.
//
// An encrypted target is measured as its plain counterpart (qcow2, or raw for raw LUKS)
// plus LUKSHeaderSpace: asking qemu-img to measure a LUKS target makes QEMU run its
// PBKDF benchmark (1.5 s of CPU) only to size a header whose size does not depend on it,
// and on hosts with tick-based CPU accounting that benchmark fails about one time in
// four with "Unable to get accurate CPU usage".
func (t *Tool) Measure(ctx context.Context, src Image, dst Format, dstKey []byte, o LUKSOptions) (*Measurement, error) {
	if err := src.check(); err != nil {
		return nil, err
	}
	if !dst.valid() || dst == LUKS && len(dstKey) == 0 || dst == Raw && len(dstKey) > 0 {
		return nil, fmt.Errorf("image %s: measuring for format %q with a key: %v: want raw without a key, or qcow2 or luks", src.Path, dst, len(dstKey) > 0)
	}
	plain, extra := dst, int64(0)
	if len(dstKey) > 0 {
		extra = LUKSHeaderSpace
		if dst == LUKS {
			plain = Raw
		}
	}
	sec := &secrets{}
	srcID := sec.addIf(src.Key)
	args := []string{"--output=json", "--image-opts", "-O", string(plain), src.imageOpts(srcID)}
	res, err := t.run(ctx, call{op: "measure", image: src.Path, sec: sec, args: args})
	if err != nil {
		return nil, err
	}
	m, err := ParseMeasure(res.stdout)
	if err != nil {
		return nil, fmt.Errorf("qemu-img measure %s: %w", src.Path, err)
	}
	m.Required += extra
	m.FullyAllocated += extra
	return m, nil
}

// Unlock checks that img.Key opens the image: qemu-img info does not try the key (it
// opens images without I/O), so this opens it fully with `qemu-img map` and discards the
// map. It opens with --force-share, so the image of a running VM can be checked too. A
// key that opens no keyslot is an *Error of kind ErrWrongKey; a qcow2 image without
// encryption is of kind ErrNotEncrypted (a key never "opens" plaintext).
func (t *Tool) Unlock(ctx context.Context, img Image) error {
	if err := img.check(); err != nil {
		return err
	}
	sec := &secrets{}
	id := sec.addIf(img.Key)
	_, err := t.run(ctx, call{op: "map", image: img.Path, sec: sec, args: []string{"-U", "--output=json", "--image-opts", img.imageOpts(id)}})
	return err
}
