package qemuimg

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestImageOpts(t *testing.T) {
	tests := []struct {
		img  Image
		sec  string
		want string
	}{
		{Image{Path: "/v/a.raw", Format: Raw}, "", "driver=raw,file.driver=file,file.filename=/v/a.raw"},
		{Image{Path: "/v/a.qcow2", Format: QCOW2, Key: []byte("k")}, "sec0", "driver=qcow2,file.driver=file,file.filename=/v/a.qcow2,encrypt.format=luks,encrypt.key-secret=sec0"},
		{Image{Path: "/v/a.luks", Format: LUKS, Key: []byte("k")}, "sec1", "driver=luks,file.driver=file,file.filename=/v/a.luks,key-secret=sec1"},
		// A comma in a path is doubled: it cannot end the value and add an option.
		{Image{Path: "/v/x,driver=raw,file.filename=/etc/shadow", Format: QCOW2}, "", "driver=qcow2,file.driver=file,file.filename=/v/x,,driver=raw,,file.filename=/etc/shadow"},
	}
	for _, tt := range tests {
		if got := tt.img.imageOpts(tt.sec); got != tt.want {
			t.Errorf("imageOpts(%q) = %q, want %q", tt.img.Path, got, tt.want)
		}
	}
}

func TestImageCheck(t *testing.T) {
	tests := []struct {
		img     Image
		wantErr string // "" = valid
	}{
		{Image{Path: "/a", Format: Raw}, ""},
		{Image{Path: "/a", Format: QCOW2, Key: []byte("k")}, ""},
		{Image{Path: "a.qcow2", Format: QCOW2}, "not absolute"},
		{Image{Path: "json:{}", Format: QCOW2}, "not absolute"},
		{Image{Path: "/a\nb", Format: QCOW2}, "NUL or newline"},
		{Image{Path: "/a", Format: "vmdk"}, `format "vmdk"`},
		{Image{Path: "/a", Format: ""}, `format ""`},
		{Image{Path: "/a", Format: LUKS}, "needs its key"},
		{Image{Path: "/a", Format: Raw, Key: []byte("k")}, "plain raw"},
	}
	for _, tt := range tests {
		err := tt.img.check()
		if tt.wantErr == "" {
			if err != nil {
				t.Errorf("check(%+v) = %v, want nil", tt.img, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("check(%q, %q) = %v, want an error containing %q", tt.img.Path, tt.img.Format, err, tt.wantErr)
		}
	}
}

func TestCreateOpts(t *testing.T) {
	tests := []struct {
		o    LUKSOptions
		f    Format
		want string
	}{
		// The cipher is always written out, never left to QEMU's defaults.
		{LUKSOptions{}, QCOW2, "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=1,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha512"},
		{LUKSOptions{IterTime: 10 * time.Millisecond, CipherMode: "cbc", IVGenAlg: "essiv", HashAlg: "sha512"}, QCOW2,
			"encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha512"},
		{LUKSOptions{IterTime: time.Microsecond, HashAlg: "sha256"}, LUKS, "key-secret=s,iter-time=1,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256"},
		{LUKSOptions{CipherAlg: "aes-128,x=y"}, LUKS, "key-secret=s,iter-time=1,cipher-alg=aes-128,,x=y,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512"},
	}
	for _, tt := range tests {
		if got := strings.Join(tt.o.createOpts(tt.f, "s"), ","); got != tt.want {
			t.Errorf("createOpts(%+v, %s) = %q, want %q", tt.o, tt.f, got, tt.want)
		}
	}
}

func TestParseProgress(t *testing.T) {
	tests := []struct {
		line string
		want float64
		ok   bool
	}{
		{"    (0.00/100%)", 0, true},
		{"    (12.50/100%)", 0.125, true},
		{"(100.00/100%)", 1, true},
		{"(101.00/100%)", 0, false},
		{"(-1/100%)", 0, false},
		{"(NaN/100%)", 0, false},
		{"Formatting 'x'", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		got, ok := parseProgress([]byte(tt.line))
		if ok != tt.ok || got != tt.want {
			t.Errorf("parseProgress(%q) = %v, %v; want %v, %v", tt.line, got, ok, tt.want, tt.ok)
		}
	}
}

func TestReadProgressOnlyGrows(t *testing.T) {
	var got []float64
	readProgress(strings.NewReader("    (0.00/100%)\r    (50.00/100%)\r    (50.00/100%)\r    (25.00/100%)\r    (100.00/100%)\r\n"),
		func(f float64) { got = append(got, f) })
	want := []float64{0, 0.5, 1}
	if len(got) != len(want) {
		t.Fatalf("reports = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("reports = %v, want %v", got, want)
		}
	}
}

func TestNewErrorKinds(t *testing.T) {
	tests := []struct {
		stderr string
		kind   error
		hint   string
	}{
		{"qemu-img: Could not open 'driver=qcow2,…': Invalid password, cannot unlock any keyslot\n", ErrWrongKey, "not this image's"},
		{"qemu-img: error while writing at byte 0: No space left on device\n", ErrNoSpace, "free space"},
		{"qemu-img: Could not open '/x': Failed to get \"write\" lock\nIs another process using the image [/x]?\n", ErrLocked, "shut it off"},
		{"qemu-img: Could not open '/nonexist': Could not open '/nonexist': No such file or directory\n", ErrNotFound, "check the path"},
		{"Content mismatch at offset 0!\n", ErrDiffer, ""},
		{"qemu-img: something new\n", ErrFailed, ""},
	}
	for _, tt := range tests {
		e := newError("convert", "/x", 1, tt.stderr, nil)
		if !errors.Is(e, tt.kind) {
			t.Errorf("newError(%q).Kind = %v, want %v", tt.stderr, e.Kind, tt.kind)
		}
		msg := e.Error()
		if !strings.Contains(msg, "/x") || !strings.Contains(msg, tt.hint) {
			t.Errorf("message %q lacks the image or the hint %q", msg, tt.hint)
		}
		if strings.ContainsAny(e.Detail, "\n\r") {
			t.Errorf("detail %q holds a line break", e.Detail)
		}
	}
}

func TestParseInfo(t *testing.T) {
	qcow := `{"virtual-size": 67108864, "filename": "/v/a.qcow2", "cluster-size": 65536, "format": "qcow2",
	 "actual-size": 2297856, "encrypted": true, "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
	 "encrypt": {"ivgen-alg": "plain64", "hash-alg": "sha256", "cipher-alg": "aes-256", "uuid": "u", "format": "luks",
	 "cipher-mode": "xts", "slots": [{"active": true, "iters": 4035, "key-offset": 4096, "stripes": 4000},
	 {"active": false, "key-offset": 262144}], "payload-offset": 2097152, "master-key-iters": 1000}}}}`
	i, err := ParseInfo([]byte(qcow))
	if err != nil {
		t.Fatal(err)
	}
	if !i.Encrypted || i.LUKS == nil || i.LUKS.CipherMode != "xts" || i.LUKS.ActiveSlots() != 1 || i.LUKS.Slots[0].Iters != 4035 || i.LUKS.MasterKeyIters != 1000 {
		t.Errorf("qcow2+LUKS parsed as %+v / %+v", i, i.LUKS)
	}
	plain := `{"virtual-size": 1, "filename": "/v/b", "format": "raw", "actual-size": 0}`
	if i, err := ParseInfo([]byte(plain)); err != nil || i.Encrypted || i.LUKS != nil {
		t.Errorf("plain raw: %+v, %v", i, err)
	}
	aes := `{"format": "qcow2", "filename": "/v/c", "format-specific": {"type": "qcow2", "data": {"encrypt": {"format": "aes"}}}}`
	if _, err := ParseInfo([]byte(aes)); err == nil || !strings.Contains(err.Error(), "only LUKS") {
		t.Errorf("old AES qcow2: %v, want a refusal naming LUKS", err)
	}
	for _, bad := range []string{"", "{", `{"format": 1}`, `[]`, `{}`} {
		if _, err := ParseInfo([]byte(bad)); err == nil {
			t.Errorf("ParseInfo(%q) accepted", bad)
		}
	}
}
