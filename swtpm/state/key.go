package state

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

// KeySource says where a key comes from (swtpm's --key sub-options).
type KeySource int

// The key sources of swtpm's --key and --migration-key.
const (
	KeyFile KeySource = iota + 1 // file=PATH: the key, hex or binary
	KeyFD                        // fd=N: the key, hex or binary, read from an inherited fd
	PwdFile                      // pwdfile=PATH: a passphrase, through the KDF
	PwdFD                        // pwdfd=N: a passphrase read from an inherited fd
)

// Modes of the mode= sub-option. They decide the key length only: swtpm-format data
// (migration blobs, swtpm state files) always use AES-CBC + HMAC-SHA256 as swtpm does,
// and nkp's own state files are always AES-256-GCM under a key derived from this one.
const (
	ModeAES128CBC = "aes-128-cbc" // swtpm's default; "aes-cbc" is an alias
	ModeAES256CBC = "aes-256-cbc"
	ModeAES256GCM = "aes-256-gcm" // nkp only: a 256-bit key, same as aes-256-cbc
)

// KeySpec is a parsed --key or --migration-key option.
type KeySpec struct {
	Source KeySource
	Path   string       // KeyFile, PwdFile
	FD     int          // KeyFD, PwdFD
	Format string       // key sources: "hex" (default) or "binary"
	Mode   string       // "" (decided by the key length; 128 bits for passphrases), or a Mode* value
	KDF    envelope.KDF // passphrase sources: pbkdf2 (default) or sha512
	Remove bool         // file sources: delete the file after reading it
}

// ParseKeySpec parses swtpm's --key / --migration-key option value, e.g.
// "pwdfd=5,mode=aes-256-cbc" or "file=/run/k,format=binary,remove". Unknown
// sub-options and contradictions are refused with a message naming them.
func ParseKeySpec(opt string) (KeySpec, error) {
	spec := KeySpec{FD: -1}
	sources := 0
	for _, kv := range strings.Split(opt, ",") {
		if kv == "" {
			continue
		}
		k, v, hasValue := strings.Cut(kv, "=")
		switch k {
		case "file", "pwdfile":
			if v == "" {
				return KeySpec{}, fmt.Errorf("key option %q: %s= needs a path", opt, k)
			}
			spec.Source, spec.Path = KeyFile, v
			if k == "pwdfile" {
				spec.Source = PwdFile
			}
			sources++
		case "fd", "pwdfd":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return KeySpec{}, fmt.Errorf("key option %q: %s= needs a file descriptor number, got %q", opt, k, v)
			}
			spec.Source, spec.FD = KeyFD, n
			if k == "pwdfd" {
				spec.Source = PwdFD
			}
			sources++
		case "format":
			if v != "hex" && v != "binary" {
				return KeySpec{}, fmt.Errorf("key option %q: format must be hex or binary, got %q", opt, v)
			}
			spec.Format = v
		case "mode":
			if _, err := modeKeyLen(v); err != nil {
				return KeySpec{}, fmt.Errorf("key option %q: %w", opt, err)
			}
			spec.Mode = v
		case "kdf":
			if v != string(envelope.KDFPBKDF2) && v != string(envelope.KDFSHA512) {
				return KeySpec{}, fmt.Errorf("key option %q: kdf must be pbkdf2 or sha512, got %q", opt, v)
			}
			spec.KDF = envelope.KDF(v)
		case "remove":
			b := true
			if hasValue {
				var err error
				if b, err = strconv.ParseBool(v); err != nil {
					return KeySpec{}, fmt.Errorf("key option %q: remove must be true or false, got %q", opt, v)
				}
			}
			spec.Remove = b
		default:
			return KeySpec{}, fmt.Errorf("key option %q: unknown sub-option %q (known: file, fd, pwdfile, pwdfd, format, mode, kdf, remove)", opt, k)
		}
	}
	if sources != 1 {
		return KeySpec{}, fmt.Errorf("key option %q: give exactly one of file=, fd=, pwdfile=, pwdfd=", opt)
	}
	return spec, nil
}

// modeKeyLen returns the key length in bytes that mode implies (0 for "": undecided).
func modeKeyLen(mode string) (int, error) {
	switch mode {
	case "":
		return 0, nil
	case "aes-cbc", ModeAES128CBC:
		return 16, nil
	case ModeAES256CBC, ModeAES256GCM:
		return 32, nil
	}
	return 0, fmt.Errorf("unknown mode %q; use aes-128-cbc, aes-256-cbc or aes-256-gcm", mode)
}

// maxKeyInput bounds what is read from a key file or fd ("0x" + 64 hex digits + newline
// fits many times over); passphrases may be longer.
const (
	maxKeyInput        = 4 << 10
	maxPassphraseInput = 1 << 20
)

// ParseKey reads the key that spec names and returns it. A passphrase goes through
// swtpm's KDF (envelope.DeriveKey). The fd of KeyFD/PwdFD is closed after reading, as
// swtpm does; with Remove the file of KeyFile/PwdFile is deleted. log, which may be nil,
// gets a warning when a key file is readable by group or others. Key material never
// appears in errors or logs.
func ParseKey(spec KeySpec, log *slog.Logger) (*Key, error) {
	modeLen, err := modeKeyLen(spec.Mode)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	var raw []byte
	limit := int64(maxKeyInput)
	if spec.Source == PwdFile || spec.Source == PwdFD {
		limit = maxPassphraseInput
	}
	var what, fix string
	switch spec.Source {
	case KeyFile, PwdFile:
		what = "key file " + spec.Path
		fix = "check the path and that the user nkp-swtpm runs as can read the file"
		raw, err = readKeyFile(spec.Path, limit, log)
	case KeyFD, PwdFD:
		what = "key fd " + strconv.Itoa(spec.FD)
		fix = "the process that starts nkp-swtpm must pass that descriptor open, holding the key"
		f := os.NewFile(uintptr(spec.FD), what)
		if f == nil {
			return nil, fmt.Errorf("%s: not a valid file descriptor; %s", what, fix)
		}
		raw, err = readLimited(f, limit)
		f.Close()
	default:
		return nil, errors.New("key: no source given; use file=, fd=, pwdfile= or pwdfd=")
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w; %s", what, err, fix)
	}
	defer clear(raw)

	var b []byte
	switch spec.Source {
	case PwdFile, PwdFD:
		n := modeLen
		if n == 0 {
			n = 16 // swtpm's default mode is aes-128-cbc
		}
		if b, err = envelope.DeriveKey(raw, n, spec.KDF); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	default:
		if b, err = decodeKey(raw, spec.Format); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		if modeLen != 0 && len(b) != modeLen {
			clear(b)
			return nil, fmt.Errorf("%s: the key is %d bits but mode %s needs %d bits", what, len(b)*8, spec.Mode, modeLen*8)
		}
	}
	// remove deletes the file once the key is good, as swtpm does (a bad key file stays
	// for the operator to look at).
	if spec.Remove && (spec.Source == KeyFile || spec.Source == PwdFile) {
		if err := os.Remove(spec.Path); err != nil {
			clear(b)
			return nil, fmt.Errorf("%s: remove after reading: %w", what, err)
		}
	}
	return &Key{b: b}, nil
}

func readKeyFile(path string, limit int64, log *slog.Logger) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Mode().Perm()&0o077 != 0 && log != nil {
		log.Warn("key file is readable by other users; make it 0600", "path", path, "mode", fi.Mode().Perm().String())
	}
	return readLimited(f, limit)
}

func readLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		clear(b)
		return nil, fmt.Errorf("read: %w", err)
	}
	if int64(len(b)) > limit {
		clear(b)
		return nil, fmt.Errorf("more than %d bytes; is this the right file?", limit)
	}
	return b, nil
}

// decodeKey parses a key as swtpm does: binary (16 or 32 bytes) or hex (32 or 64
// digits, optional 0x, optional trailing whitespace).
func decodeKey(raw []byte, format string) ([]byte, error) {
	switch format {
	case "binary":
		if len(raw) != 16 && len(raw) != 32 {
			return nil, fmt.Errorf("binary key is %d bytes; want 16 or 32", len(raw))
		}
		return append([]byte{}, raw...), nil
	case "", "hex":
		s := raw
		if len(s) >= 2 && s[0] == '0' && (s[1] == 'x') {
			s = s[2:]
		}
		n := 0
		for n < len(s) && !isSpace(s[n]) {
			n++
		}
		for _, c := range s[n:] {
			if !isSpace(c) {
				return nil, errors.New("hex key has text after whitespace; want one line of 32 or 64 hex digits")
			}
		}
		if n != 32 && n != 64 {
			return nil, fmt.Errorf("hex key has %d digits; want 32 (128 bits) or 64 (256 bits)", n)
		}
		b := make([]byte, n/2)
		if _, err := hex.Decode(b, s[:n]); err != nil {
			clear(b)
			return nil, errors.New("hex key holds a character that is not a hex digit; for a raw key pass format=binary")
		}
		return b, nil
	default:
		return nil, fmt.Errorf("unknown key format %q; use hex or binary", format)
	}
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\v' || c == '\f'
}

// Key is a 128- or 256-bit state or migration key. It prints as "[redacted]" under
// every fmt verb and in slog, so it cannot leak through a log line by mistake.
type Key struct{ b []byte }

// NewKey returns a Key holding a copy of b (16 or 32 bytes), for keys that come from
// memory (nkp-hostd derives them). The caller wipes b.
func NewKey(b []byte) (*Key, error) {
	if len(b) != 16 && len(b) != 32 {
		return nil, fmt.Errorf("key: %d bytes; want 16 or 32", len(b))
	}
	return &Key{b: append([]byte{}, b...)}, nil
}

// Bytes returns the key material itself (not a copy): for envelope's migration blobs.
// Do not keep it beyond the Key's life; Wipe zeroes it.
func (k *Key) Bytes() []byte {
	if k == nil {
		return nil
	}
	return k.b
}

// Len returns the key length in bytes (0 after Wipe).
func (k *Key) Len() int {
	if k == nil {
		return 0
	}
	return len(k.b)
}

// Wipe zeroes the key material and empties the Key.
func (k *Key) Wipe() {
	if k == nil {
		return
	}
	clear(k.b)
	k.b = nil
}

// Format prints "[redacted N-bit key]" whatever the verb.
func (k *Key) Format(f fmt.State, _ rune) {
	fmt.Fprintf(f, "[redacted %d-bit key]", k.Len()*8)
}

// LogValue keeps the key out of structured logs.
func (k *Key) LogValue() slog.Value {
	return slog.StringValue(fmt.Sprintf("[redacted %d-bit key]", k.Len()*8))
}
