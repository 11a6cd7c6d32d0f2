package envelope

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const fixtures = "testdata/swtpm-0.7.1"

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtures, name))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	return b
}

func hexKey(t testing.TB, name string) []byte {
	t.Helper()
	k, err := hex.DecodeString(strings.TrimSpace(string(readFixture(t, name))))
	if err != nil {
		t.Fatalf("fixture key %s: %v", name, err)
	}
	return k
}

// TestSwtpmMigrationBlobs unwraps blobs that swtpm 0.7.1 sent for GET_STATEBLOB, with
// and without the DECRYPTED flag, and checks that both forms of one TPM give the same
// libtpms payload and that swtpm's reply flags are what ForMigration would say.
func TestSwtpmMigrationBlobs(t *testing.T) {
	plain, err := FromMigration(readFixture(t, "plain.dec.permall"), 0, nil, nil)
	if err != nil || len(plain) < 100 {
		t.Fatalf("plain blob: %d bytes, %v", len(plain), err)
	}
	tests := []struct {
		name       string
		mig, state string // key fixture names, "" for none
		hdrDec     uint16 // header flags of the DECRYPTED reply
		hdrEnc     uint16 // header flags of the reply without DECRYPTED
	}{
		{"plain", "", "", 0x04, 0x04},
		{"mig128", "mig128.hex", "", 0x06, 0x06},
		{"mig256", "mig256.hex", "", 0x16, 0x16},
		{"state256", "", "state256.hex", 0x04, 0x0d},
		{"both", "mig256.hex", "state256.hex", 0x16, 0x1f},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mig, state []byte
			if tt.mig != "" {
				mig = hexKey(t, tt.mig)
			}
			if tt.state != "" {
				state = hexKey(t, tt.state)
			}
			dec := readFixture(t, tt.name+".dec.permall")
			enc := readFixture(t, tt.name+".enc.permall")
			f, err := strconv.Atoi(strings.TrimSpace(string(readFixture(t, tt.name+".enc.flags"))))
			if err != nil {
				t.Fatal(err)
			}
			encFlags := uint32(f)
			for _, c := range []struct {
				blob []byte
				hdr  uint16
			}{{dec, tt.hdrDec}, {enc, tt.hdrEnc}} {
				h, _, err := ParseHeader(c.blob)
				if err != nil {
					t.Fatal(err)
				}
				if h.Flags != c.hdr {
					t.Errorf("header flags %#x, want %#x", h.Flags, c.hdr)
				}
			}
			a, err := FromMigration(dec, 0, mig, state)
			if err != nil {
				t.Fatalf("decrypted form: %v", err)
			}
			b, err := FromMigration(enc, encFlags, mig, state)
			if err != nil {
				t.Fatalf("encrypted form: %v", err)
			}
			if !bytes.Equal(a, b) || len(a) != len(plain) {
				t.Errorf("payloads differ: %d and %d bytes (plain TPM: %d)", len(a), len(b), len(plain))
			}
			// What nkp makes for the same request has swtpm's flags and size.
			for _, c := range []struct {
				decrypted bool
				swtpm     []byte
				flags     uint32
			}{{true, dec, 0}, {false, enc, encFlags}} {
				ours, flags, err := ForMigrationWithStateKey(a, mig, state, c.decrypted)
				if err != nil {
					t.Fatal(err)
				}
				if flags != c.flags || len(ours) != len(c.swtpm) || !bytes.Equal(ours[:HeaderSize], c.swtpm[:HeaderSize]) {
					t.Errorf("decrypted=%v: ours flags %d, %d bytes, header %x; swtpm flags %d, %d bytes, header %x",
						c.decrypted, flags, len(ours), ours[:HeaderSize], c.flags, len(c.swtpm), c.swtpm[:HeaderSize])
				}
				back, err := FromMigration(ours, flags, mig, state)
				if err != nil || !bytes.Equal(back, a) {
					t.Errorf("decrypted=%v: round trip: %v", c.decrypted, err)
				}
			}
		})
	}
}

// TestPlainIsByteExact: unencrypted envelopes are deterministic, so nkp's must equal
// swtpm's byte for byte.
func TestPlainIsByteExact(t *testing.T) {
	swtpm := readFixture(t, "plain.dec.permall")
	data, err := FromMigration(swtpm, 0, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ours, flags, err := ForMigration(data, nil, true)
	if err != nil || flags != 0 {
		t.Fatalf("ForMigration: flags %d, %v", flags, err)
	}
	if !bytes.Equal(ours, swtpm) {
		t.Errorf("migration blob differs from swtpm's:\n ours  %x\n swtpm %x", ours[:32], swtpm[:32])
	}
	file, err := EncodeFile(data, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := append(AppendHeader(nil, 0, 6+len(data)), AppendTLVs(nil, TLV{TagData, data})...)
	if !bytes.Equal(file, want) {
		t.Errorf("EncodeFile: got %x…", file[:16])
	}
}

func TestFileRoundTrip(t *testing.T) {
	k16 := bytes.Repeat([]byte{1}, 16)
	k32 := bytes.Repeat([]byte{2}, 32)
	for _, key := range [][]byte{nil, k16, k32} {
		for _, n := range []int{0, 1, 15, 16, 17, 31, 32, 33, 1299, 9000} {
			data := bytes.Repeat([]byte{0xa5}, n)
			blob, err := EncodeFile(data, key)
			if err != nil {
				t.Fatal(err)
			}
			got, err := DecodeFile(blob, key)
			if err != nil || !bytes.Equal(got, data) {
				t.Errorf("key %d bytes, data %d bytes: got %d bytes, %v", len(key), n, len(got), err)
			}
			if key != nil {
				// Padding goes to a multiple of the key length, as swtpm pads.
				ct, _ := Find(blob[HeaderSize:], TagEncryptedData)
				if len(ct)%len(key) != 0 || len(ct) <= n {
					t.Errorf("key %d bytes, data %d: ciphertext %d bytes", len(key), n, len(ct))
				}
				if bytes.Contains(blob, bytes.Repeat([]byte{0xa5}, 8)) {
					t.Errorf("plaintext visible in an encrypted file")
				}
			}
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	k16 := bytes.Repeat([]byte{1}, 16)
	k32 := bytes.Repeat([]byte{2}, 32)
	other32 := bytes.Repeat([]byte{3}, 32)
	enc32, _ := EncodeFile([]byte("secret tpm state"), k32)
	plain, _ := EncodeFile([]byte("tpm state"), nil)
	badMin := append([]byte{}, plain...)
	badMin[1] = 3
	badHdr := append([]byte{}, plain...)
	badHdr[3] = 12
	noData := Encode(0, TLV{TagHMAC, []byte("x")})
	tests := []struct {
		name string
		blob []byte
		key  []byte
		want error
		code uint32
	}{
		{"empty", nil, nil, ErrMalformed, resBadParameter},
		{"truncated", plain[:len(plain)-1], nil, ErrMalformed, resBadParameter},
		{"trailing", append(append([]byte{}, plain...), 0), nil, ErrMalformed, resBadParameter},
		{"min version", badMin, nil, ErrVersion, resBadVersion},
		{"header size", badHdr, nil, ErrMalformed, resBadDataSize},
		{"no data TLV", noData, nil, ErrMalformed, resFail},
		{"no key", enc32, nil, ErrKeyNotFound, resKeyNotFound},
		{"key for plain", plain, k32, ErrNotEncrypted, resFail},
		{"wrong key", enc32, other32, ErrAuth, resDecryptError},
		{"wrong key size", enc32, k16, ErrKeySize, resBadKeyProperty},
		{"bad key size", enc32, []byte("short"), ErrKeySize, resBadKeyProperty},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeFile(tt.blob, tt.key)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if c := ResultCode(err); c != tt.code {
				t.Errorf("ResultCode = %#x, want %#x", c, tt.code)
			}
		})
	}
}

// TestTamper flips every byte after the header of encrypted blobs, one at a time: each
// must fail. swtpm's header is not authenticated (min_version and the flags of layers
// that are not there are not read back), so only nkp's own AEAD files in swtpm/state
// cover their header too.
func TestTamper(t *testing.T) {
	k32 := bytes.Repeat([]byte{2}, 32)
	m16 := bytes.Repeat([]byte{4}, 16)
	file, _ := EncodeFile(bytes.Repeat([]byte("nv"), 40), k32)
	mig, flags, _ := ForMigrationWithStateKey(bytes.Repeat([]byte("nv"), 40), m16, k32, false)
	for i := HeaderSize; i < len(file); i++ {
		b := append([]byte{}, file...)
		b[i] ^= 0x01
		if got, err := DecodeFile(b, k32); err == nil {
			t.Fatalf("file with byte %d flipped decoded to %q", i, got)
		}
	}
	for i := HeaderSize; i < len(mig); i++ {
		b := append([]byte{}, mig...)
		b[i] ^= 0x80
		if got, err := FromMigration(b, flags, m16, k32); err == nil {
			t.Fatalf("migration blob with byte %d flipped decoded to %q", i, got)
		}
	}
}

func TestMigrationErrors(t *testing.T) {
	m16 := bytes.Repeat([]byte{4}, 16)
	m32 := bytes.Repeat([]byte{5}, 32)
	s32 := bytes.Repeat([]byte{6}, 32)
	data := []byte("libtpms state")
	both, flags, _ := ForMigrationWithStateKey(data, m32, s32, false)
	plain, _, _ := ForMigration(data, nil, true)
	tests := []struct {
		name        string
		blob        []byte
		flags       uint32
		mig, state  []byte
		want        error
		wantPayload []byte
	}{
		{"empty clears", nil, 0, nil, nil, nil, nil},
		{"empty body clears", AppendHeader(nil, FlagMigrationData, 0), 0, nil, nil, nil, nil},
		{"no migration key", both, flags, nil, s32, ErrKeyNotFound, nil},
		{"no state key", both, flags, m32, nil, ErrKeyNotFound, nil},
		{"wrong migration key size", both, flags, m16, s32, ErrKeySize, nil},
		{"wrong migration key", both, flags, bytes.Repeat([]byte{9}, 32), s32, ErrAuth, nil},
		{"wrong state key", both, flags, m32, bytes.Repeat([]byte{9}, 32), ErrAuth, nil},
		{"plain accepted with keys set", plain, 0, m32, s32, nil, data},
		{"ENCRYPTED request on plain data", plain, StateFlagEncrypted, nil, s32, ErrKeySize, nil},
		{"both keys", both, flags, m32, s32, nil, data},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := FromMigration(tt.blob, tt.flags, tt.mig, tt.state)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if !bytes.Equal(got, tt.wantPayload) {
				t.Errorf("payload %q, want %q", got, tt.wantPayload)
			}
		})
	}
}

func TestDeriveKey(t *testing.T) {
	pass := []byte("correct horse battery staple\n") // the whole file, newline included
	tests := []struct {
		kdf  KDF
		n    int
		want string // computed independently with Python's hashlib
	}{
		{KDFPBKDF2, 32, pbkdf2Ref32},
		{KDFPBKDF2, 16, pbkdf2Ref32[:32]},
		{KDFSHA512, 32, sha512Ref[:64]},
		{KDFSHA512, 16, sha512Ref[:32]},
	}
	for _, tt := range tests {
		k, err := DeriveKey(pass, tt.n, tt.kdf)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(k) != tt.want {
			t.Errorf("%s/%d: %x, want %s", tt.kdf, tt.n, k, tt.want)
		}
	}
	if _, err := DeriveKey(pass, 24, KDFPBKDF2); !errors.Is(err, ErrKeySize) {
		t.Errorf("24-byte key: %v", err)
	}
	if _, err := DeriveKey(pass, 32, "scrypt"); err == nil {
		t.Errorf("unknown kdf accepted")
	}
}

// References computed with Python's hashlib.pbkdf2_hmac("sha512", pass, b"swtpm", 1000, 32)
// and hashlib.sha512(pass).
const (
	pbkdf2Ref32 = "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee"
	sha512Ref   = "b3bf1950a302702ce2661a76c1c69f9d0abb92ad61b65f4c96a09b683d7d2f1665e66ea3dff4e868bc03b0968c71e510f76c781bc82e6c578b0bb32e5a2c4be1"
)
