package state

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

func TestParseKeySpec(t *testing.T) {
	tests := []struct {
		opt     string
		want    KeySpec
		wantErr string
	}{
		{opt: "file=/k", want: KeySpec{Source: KeyFile, Path: "/k", FD: -1}},
		{opt: "fd=3,mode=aes-256-cbc,format=binary", want: KeySpec{Source: KeyFD, FD: 3, Mode: ModeAES256CBC, Format: "binary"}},
		{opt: "pwdfd=5,mode=aes-256-cbc,kdf=sha512,remove", want: KeySpec{Source: PwdFD, FD: 5, Mode: ModeAES256CBC, KDF: envelope.KDFSHA512, Remove: true}},
		{opt: "pwdfile=/p,remove=false,mode=aes-cbc", want: KeySpec{Source: PwdFile, Path: "/p", FD: -1, Mode: "aes-cbc"}},
		{opt: "file=/k,mode=aes-256-gcm", want: KeySpec{Source: KeyFile, Path: "/k", FD: -1, Mode: ModeAES256GCM}},
		{opt: "", wantErr: "exactly one of"},
		{opt: "file=/a,pwdfile=/b", wantErr: "exactly one of"},
		{opt: "file=", wantErr: "needs a path"},
		{opt: "fd=x", wantErr: "file descriptor number"},
		{opt: "file=/k,mode=aes-512-cbc", wantErr: "unknown mode"},
		{opt: "file=/k,format=base64", wantErr: "hex or binary"},
		{opt: "pwdfile=/k,kdf=argon2", wantErr: "pbkdf2 or sha512"},
		{opt: "file=/k,remove=maybe", wantErr: "true or false"},
		{opt: "file=/k,bogus=1", wantErr: `unknown sub-option "bogus"`},
	}
	for _, tt := range tests {
		got, err := ParseKeySpec(tt.opt)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%q: err = %v, want %q", tt.opt, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%q: %+v, %v; want %+v", tt.opt, got, err, tt.want)
		}
	}
}

func TestParseKey(t *testing.T) {
	k32 := bytes.Repeat([]byte{0xab}, 32)
	k16 := bytes.Repeat([]byte{0xcd}, 16)
	hex32, hex16 := hex.EncodeToString(k32), hex.EncodeToString(k16)
	pass := []byte("correct horse battery staple\n")
	pbkdf32, _ := envelope.DeriveKey(pass, 32, envelope.KDFPBKDF2)
	pbkdf16, _ := envelope.DeriveKey(pass, 16, envelope.KDFPBKDF2)
	sha32, _ := envelope.DeriveKey(pass, 32, envelope.KDFSHA512)
	tests := []struct {
		name    string
		content []byte
		spec    KeySpec
		want    []byte
		wantErr string
	}{
		{"hex 256", []byte(hex32 + "\n"), KeySpec{Source: KeyFile}, k32, ""},
		{"hex 128", []byte(hex16), KeySpec{Source: KeyFile}, k16, ""},
		{"hex 0x", []byte("0x" + hex32), KeySpec{Source: KeyFile, Mode: ModeAES256CBC}, k32, ""},
		{"hex upper", []byte(strings.ToUpper(hex32) + "\r\n"), KeySpec{Source: KeyFile}, k32, ""},
		{"hex mode mismatch", []byte(hex32), KeySpec{Source: KeyFile, Mode: ModeAES128CBC}, nil, "mode aes-128-cbc needs 128 bits"},
		{"hex 40 digits", []byte(hex32[:40]), KeySpec{Source: KeyFile}, nil, "40 digits"},
		{"hex not hex", []byte(strings.Repeat("zz", 32)), KeySpec{Source: KeyFile}, nil, "not a hex digit"},
		{"hex two lines", []byte(hex32 + "\n" + hex32), KeySpec{Source: KeyFile}, nil, "text after whitespace"},
		{"binary 256", k32, KeySpec{Source: KeyFile, Format: "binary"}, k32, ""},
		{"binary 20", k32[:20], KeySpec{Source: KeyFile, Format: "binary"}, nil, "20 bytes"},
		{"pbkdf2 256", pass, KeySpec{Source: PwdFile, Mode: ModeAES256CBC}, pbkdf32, ""},
		{"pbkdf2 default mode", pass, KeySpec{Source: PwdFile}, pbkdf16, ""},
		{"sha512", pass, KeySpec{Source: PwdFile, Mode: ModeAES256CBC, KDF: envelope.KDFSHA512}, sha32, ""},
		{"huge", bytes.Repeat([]byte{'a'}, 5000), KeySpec{Source: KeyFile}, nil, "more than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "key")
			if err := os.WriteFile(p, tt.content, 0o600); err != nil {
				t.Fatal(err)
			}
			tt.spec.Path = p
			k, err := ParseKey(tt.spec, nil)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), hex32[:16]) || strings.Contains(err.Error(), "zzzz") {
					t.Errorf("error shows key material: %v", err)
				}
				return
			}
			if err != nil || !bytes.Equal(k.Bytes(), tt.want) {
				t.Fatalf("key %d bytes, %v", k.Len(), err)
			}
			if _, err := os.Stat(p); err != nil {
				t.Errorf("key file removed without remove: %v", err)
			}
		})
	}
}

func TestParseKeyFDAndRemove(t *testing.T) {
	k32 := bytes.Repeat([]byte{0x5a}, 32)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(r.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Write(k32)
	w.Close()
	k, err := ParseKey(KeySpec{Source: KeyFD, FD: fd, Format: "binary", Mode: ModeAES256CBC}, nil)
	if err != nil || !bytes.Equal(k.Bytes(), k32) {
		t.Fatalf("fd key: %v", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("the key fd was left open")
	}

	p := filepath.Join(t.TempDir(), "key")
	os.WriteFile(p, []byte(hex.EncodeToString(k32)), 0o644)
	var logBuf bytes.Buffer
	k, err = ParseKey(KeySpec{Source: KeyFile, Path: p, Remove: true}, slog.New(slog.NewTextHandler(&logBuf, nil)))
	if err != nil || !bytes.Equal(k.Bytes(), k32) {
		t.Fatalf("file key: %v", err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("remove did not delete the key file: %v", err)
	}
	if !strings.Contains(logBuf.String(), "readable by other users") {
		t.Errorf("no warning for a 0644 key file: %q", logBuf.String())
	}
	if _, err := ParseKey(KeySpec{Source: KeyFD, FD: 1 << 20}, nil); err == nil {
		t.Errorf("a closed fd gave a key")
	}
}

func TestKeyRedactedAndWiped(t *testing.T) {
	raw := bytes.Repeat([]byte{0x42}, 32)
	k, _ := NewKey(raw)
	var logBuf bytes.Buffer
	slog.New(slog.NewTextHandler(&logBuf, nil)).Info("key", "key", k)
	out := fmt.Sprintf("%v %+v %s %x %q %#v", k, k, k, k, k, k) + logBuf.String()
	for _, leak := range []string{"4242", "BBBB", "\\x42"} {
		if strings.Contains(out, leak) {
			t.Fatalf("key material printed: %s", out)
		}
	}
	if !strings.Contains(out, "redacted 256-bit key") {
		t.Errorf("printed as %q", out)
	}
	b := k.Bytes()
	k.Wipe()
	if !bytes.Equal(b, make([]byte, 32)) || k.Len() != 0 || k.Bytes() != nil {
		t.Errorf("Wipe left key material")
	}
	var nilKey *Key
	nilKey.Wipe()
	if nilKey.Len() != 0 || fmt.Sprint(nilKey) == "" {
		t.Errorf("nil key")
	}
}
