package qemuimg

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// Format is an image format as qemu-img names its block drivers.
type Format string

// The formats nkp reads and writes.
const (
	Raw   Format = "raw"   // plain raw file or block device
	QCOW2 Format = "qcow2" // qcow2, plain or with LUKS inside (Image.Key set)
	LUKS  Format = "luks"  // raw LUKS: the whole file is a LUKS volume
)

func (f Format) valid() bool { return f == Raw || f == QCOW2 || f == LUKS }

// Image names one image file and how to open it.
type Image struct {
	// Path is the absolute path of the image file.
	Path string
	// Format is the driver qemu-img opens it with; it is never probed.
	Format Format
	// Key is the LUKS passphrase of an encrypted image (Format LUKS, or QCOW2 with LUKS
	// inside); nil for a plain image. It is written to a pipe for each call, never kept.
	Key []byte
}

func (img Image) String() string { return img.Path }

func (img Image) check() error {
	if !filepath.IsAbs(img.Path) {
		return fmt.Errorf("image %q: path is not absolute: give the full path (qemu-img would read a relative name such as \"json:…\" as a protocol)", img.Path)
	}
	if strings.ContainsAny(img.Path, "\x00\n") {
		return fmt.Errorf("image %q: path holds a NUL or newline: rename the file", img.Path)
	}
	if !img.Format.valid() {
		return fmt.Errorf("image %s: format %q is not one of raw, qcow2, luks", img.Path, img.Format)
	}
	if img.Format == LUKS && len(img.Key) == 0 {
		return fmt.Errorf("image %s: a raw LUKS image needs its key", img.Path)
	}
	if img.Format == Raw && len(img.Key) > 0 {
		return fmt.Errorf("image %s: a key was given for a plain raw image: use format luks for raw LUKS", img.Path)
	}
	return nil
}

// escape doubles commas, as QEMU's option syntax requires for a literal comma in a value.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// imageOpts is the --image-opts string that opens img with secret id sec ("" without key).
func (img Image) imageOpts(sec string) string {
	o := "driver=" + string(img.Format) + ",file.driver=file,file.filename=" + escape(img.Path)
	switch {
	case sec == "":
	case img.Format == LUKS:
		o += ",key-secret=" + sec
	default:
		// encrypt.format=luks: a qcow2 image without encryption then fails to open
		// instead of ignoring the key (qemu-img would "open" a plain qcow2 with any key).
		o += ",encrypt.format=luks,encrypt.key-secret=" + sec
	}
	return o
}

// DefaultIterTime is the PBKDF iteration time nkp gives new keyslots: QEMU's minimum.
// With a 256-bit random passphrase the PBKDF adds no strength, and each unlock costs
// milliseconds instead of the two seconds of QEMU's default (2000 ms).
const DefaultIterTime = time.Millisecond

// DefaultHashAlg is the LUKS hash nkp gives new images: SHA-512, not QEMU's SHA-256.
// Before QEMU writes a keyslot it times 32,768 PBKDF2 iterations with the thread's CPU
// clock; with SHA-256 (SHA-NI) they take about 3 ms, under one scheduler tick, so on
// hosts with tick-based CPU accounting the clock often reads 0 and QEMU fails with
// "Unable to get accurate CPU usage" (here: 5 in 20 calls, and 8 in a row in CI). With
// SHA-512 they take about 20 ms: 0 failures in 60. Counted with (KEY a 0600 file, H the
// hash):
//
//	for i in $(seq 20); do qemu-img create --object secret,id=k,file=KEY -f luks \
//	  -o key-secret=k,iter-time=1,hash-alg=H /dev/shm/t.luks 1M; rm -f /dev/shm/t.luks
//	done 2>&1 | grep -c accurate
//
// The passphrase is a 256-bit random key, so the hash adds no strength either way; the
// timing costs about 0.7 s more CPU per keyslot.
const DefaultHashAlg = "sha512"

// DefaultCipherAlg, DefaultCipherMode and DefaultIVGenAlg are the cipher nkp gives new
// images, written out rather than left to QEMU's defaults so that a QEMU with other
// defaults makes the same images: see the package doc for why this one.
const (
	DefaultCipherAlg  = "aes-256"
	DefaultCipherMode = "xts"
	DefaultIVGenAlg   = "plain64"
)

// LUKSOptions are the LUKS settings of a new image or keyslot. The zero value means
// DefaultCipherAlg in DefaultCipherMode with DefaultIVGenAlg IVs, DefaultHashAlg and
// DefaultIterTime.
type LUKSOptions struct {
	// IterTime is the PBKDF time per keyslot; zero means DefaultIterTime.
	IterTime time.Duration
	// CipherAlg (e.g. "aes-256"), CipherMode ("xts"), IVGenAlg ("plain64") and HashAlg:
	// empty means nkp's default (the Default… constants).
	CipherAlg, CipherMode, IVGenAlg, HashAlg string
}

func (o LUKSOptions) iterMillis() int64 {
	t := o.IterTime
	if t <= 0 {
		t = DefaultIterTime
	}
	ms := t.Milliseconds()
	if ms < 1 {
		ms = 1
	}
	return ms
}

// createOpts renders the -o options that make a new encrypted image of format f with the
// key in secret sec.
func (o LUKSOptions) createOpts(f Format, sec string) []string {
	p := "encrypt."
	var opts []string
	if f == LUKS {
		p = ""
	} else {
		opts = append(opts, "encrypt.format=luks")
	}
	opts = append(opts, p+"key-secret="+sec, fmt.Sprintf("%siter-time=%d", p, o.iterMillis()))
	or := func(v, def string) string {
		if v == "" {
			return def
		}
		return v
	}
	for _, kv := range [][2]string{{"cipher-alg", or(o.CipherAlg, DefaultCipherAlg)}, {"cipher-mode", or(o.CipherMode, DefaultCipherMode)}, {"ivgen-alg", or(o.IVGenAlg, DefaultIVGenAlg)}, {"hash-alg", or(o.HashAlg, DefaultHashAlg)}} {
		opts = append(opts, p+kv[0]+"="+escape(kv[1]))
	}
	return opts
}
