package state

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

func testKey(t testing.TB, b byte, n int) *Key {
	t.Helper()
	k, err := NewKey(bytes.Repeat([]byte{b}, n))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustOpen(t testing.TB, dir string, opts Options) *Dir {
	t.Helper()
	d, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		key  *Key
	}{
		{"plaintext", nil},
		{"128-bit key", testKey(t, 1, 16)},
		{"256-bit key", testKey(t, 2, 32)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			d := mustOpen(t, dir, Options{Key: tt.key})
			want := map[string][]byte{}
			for i, name := range Names {
				want[name] = bytes.Repeat([]byte{byte(i + 1)}, []int{0, 1, 9000}[i])
				if err := d.Store(name, want[name]); err != nil {
					t.Fatal(err)
				}
			}
			d.Close()
			d = mustOpen(t, dir, Options{Key: tt.key})
			for _, name := range Names {
				got, err := d.Load(name)
				if err != nil || !bytes.Equal(got, want[name]) {
					t.Errorf("%s: %d bytes, %v; want %d bytes", name, len(got), err, len(want[name]))
				}
			}
			if err := d.Delete("volatilestate"); err != nil {
				t.Fatal(err)
			}
			if _, err := d.Load("volatilestate"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("after Delete: %v, want ErrNotExist", err)
			}
			if err := d.Delete("volatilestate"); err != nil {
				t.Errorf("deleting a missing blob: %v", err)
			}
			if _, err := d.Load("../etc/passwd"); err == nil {
				t.Errorf("unknown blob name accepted")
			}
		})
	}
}

// TestFormats checks what lands on disk: nkp's AEAD file with a key (no plaintext, a
// fresh nonce each write), swtpm's plaintext envelope without.
func TestFormats(t *testing.T) {
	secret := []byte("NV-INDEX-0x1500016=BitLocker-recovery-123456-654321")
	payload := append(bytes.Repeat([]byte{0}, 100), secret...)

	dir := t.TempDir()
	d := mustOpen(t, dir, Options{Key: testKey(t, 3, 32)})
	if err := d.Store("permall", payload); err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	payload2 := bytes.Clone(payload)
	payload2[0] = 1 // the same payload again is not written at all (TestStoreUnchanged)
	if err := d.Store("permall", payload2); err != nil {
		t.Fatal(err)
	}
	second, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	if !bytes.HasPrefix(first, []byte(fileMagic)) || first[8] != fileVersionBound || first[9] != 1 {
		t.Errorf("header %q: want magic, version 3 and blob type 1", first[:10])
	}
	id, err := os.ReadFile(filepath.Join(dir, stateIDFile))
	if err != nil || string(id) != hex.EncodeToString(first[48:64])+"\n" {
		t.Errorf("the record's state ID %x is not the directory's %q (%v)", first[48:64], id, err)
	}
	if bytes.Contains(first, secret[:16]) || bytes.Contains(second, secret[:16]) {
		t.Errorf("an encrypted state file holds the plaintext")
	}
	size := slotSizeFor(len(payload))
	if len(first) != 2*size || len(second) != 2*size || size%slotAlign != 0 {
		t.Fatalf("file is %d then %d bytes, want two slots of %d", len(first), len(second), size)
	}
	// The second write went into slot 1 in place; slot 0 kept the first record.
	if !bytes.Equal(second[:size], first[:size]) {
		t.Errorf("the second write changed the slot of the newest record")
	}
	if bytes.Equal(first[20:32], second[size+20:size+32]) {
		t.Errorf("two writes used the same nonce")
	}
	if got := binary.BigEndian.Uint64(second[size+32:]); got != binary.BigEndian.Uint64(first[32:])+1 {
		t.Errorf("slot 1 sequence number %d, want one more than slot 0's", got)
	}

	plainDir := t.TempDir()
	var logBuf bytes.Buffer
	p := mustOpen(t, plainDir, Options{Log: slog.New(slog.NewTextHandler(&logBuf, nil))})
	if err := p.Store("permall", payload); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(plainDir, "tpm2-00.permall"))
	want, _ := envelope.EncodeFile(payload, nil)
	if !bytes.Equal(got, want) {
		t.Errorf("plaintext file is not swtpm's envelope")
	}
	if n := strings.Count(logBuf.String(), "not encrypted"); n != 1 {
		t.Errorf("want one warning about plaintext state, got %d: %s", n, logBuf.String())
	}
}

func TestModes(t *testing.T) {
	tests := []struct {
		mode, want os.FileMode
	}{{0, 0o640}, {0o600, 0o600}, {0o644, 0o644}}
	old := setUmask(0o077) // the file mode must not depend on the umask
	defer setUmask(old)
	for _, tt := range tests {
		dir := t.TempDir()
		if err := os.Chmod(dir, 0o751); err != nil {
			t.Fatal(err)
		}
		d := mustOpen(t, dir, Options{Mode: tt.mode})
		if err := d.Store("permall", []byte("x")); err != nil {
			t.Fatal(err)
		}
		fi, _ := os.Stat(filepath.Join(dir, "tpm2-00.permall"))
		if fi.Mode().Perm() != tt.want {
			t.Errorf("mode %o: file is %o, want %o", tt.mode, fi.Mode().Perm(), tt.want)
		}
		di, _ := os.Stat(dir)
		if di.Mode().Perm() != 0o751 {
			t.Errorf("directory mode changed to %o", di.Mode().Perm())
		}
	}
}

// TestTamper flips each byte of an nkp file: every one must fail to open, leave the
// file as it was, and make Store and Delete of that blob refuse.
func TestTamper(t *testing.T) {
	dir := t.TempDir()
	key := testKey(t, 4, 32)
	d := mustOpen(t, dir, Options{Key: key})
	if err := d.Store("permall", []byte("tpm permanent state")); err != nil {
		t.Fatal(err)
	}
	d.Close()
	path := filepath.Join(dir, "tpm2-00.permall")
	orig, _ := os.ReadFile(path)
	// The only record is in slot 0 (slot 1 is empty): any change to it is an error.
	record := slotHeaderSize + len("tpm permanent state") + 16
	for i := range record {
		bad := append([]byte{}, orig...)
		bad[i] ^= 0x04
		if err := os.WriteFile(path, bad, 0o600); err != nil {
			t.Fatal(err)
		}
		d, err := Open(dir, Options{Key: key})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := d.Load("permall"); err == nil {
			t.Fatalf("byte %d flipped: loaded %q", i, got)
		}
		if err := d.Store("permall", []byte("new")); err == nil {
			t.Fatalf("byte %d flipped: Store overwrote an unreadable file", i)
		}
		if err := d.Delete("permall"); err == nil {
			t.Fatalf("byte %d flipped: Delete removed an unreadable file", i)
		}
		d.Close()
		if now, _ := os.ReadFile(path); !bytes.Equal(now, bad) {
			t.Fatalf("byte %d flipped: the file was changed", i)
		}
	}
	// A damaged body under the right key says so.
	bad := append([]byte{}, orig...)
	bad[record-1] ^= 1
	os.WriteFile(path, bad, 0o600)
	d = mustOpen(t, dir, Options{Key: key})
	if _, err := d.Load("permall"); err == nil || !strings.Contains(err.Error(), "the file itself is damaged") {
		t.Errorf("damaged file: %v", err)
	}
	d.Close()

	// Damage outside the newest record (the empty slot, unused bytes) changes nothing.
	for _, i := range []int{record, len(orig) / 2, len(orig) - 1} {
		bad := append([]byte{}, orig...)
		bad[i] ^= 0x40
		os.WriteFile(path, bad, 0o600)
		d = mustOpen(t, dir, Options{Key: key})
		if got, err := d.Load("permall"); err != nil || string(got) != "tpm permanent state" {
			t.Errorf("byte %d (outside the record) flipped: Load = %q, %v", i, got, err)
		}
		d.Close()
	}

	// Truncations, garbage and renames.
	cases := []struct {
		name string
		file []byte
		blob string
		want error
	}{
		{"empty", nil, "permall", ErrCorrupt},
		{"header only", orig[:fileHeaderSize], "permall", ErrCorrupt},
		{"truncated", orig[:len(orig)-1], "permall", ErrCorrupt},
		{"truncated to one slot", orig[:len(orig)/2], "permall", ErrCorrupt},
		{"garbage", []byte("this is not a TPM state file at all"), "permall", ErrCorrupt},
		{"renamed to volatilestate", orig, "volatilestate", ErrBlobType},
		{"huge", make([]byte, maxFileSize+1), "permall", ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, FileName(c.blob))
			if err := os.WriteFile(p, c.file, 0o600); err != nil {
				t.Fatal(err)
			}
			d := mustOpen(t, dir, Options{Key: key})
			_, err := d.Load(c.blob)
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			if !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "left untouched") {
				t.Errorf("error does not name the file and its fate: %v", err)
			}
			if now, _ := os.ReadFile(p); !bytes.Equal(now, c.file) {
				t.Errorf("file changed")
			}
		})
	}
}

func TestWrongKey(t *testing.T) {
	dir := t.TempDir()
	d := mustOpen(t, dir, Options{Key: testKey(t, 5, 32)})
	if err := d.Store("permall", []byte("state under key 5")); err != nil {
		t.Fatal(err)
	}
	d.Close()
	path := filepath.Join(dir, "tpm2-00.permall")
	before, _ := os.ReadFile(path)

	tests := []struct {
		name string
		key  *Key
		want error
	}{
		{"other key", testKey(t, 6, 32), ErrAuth},
		{"other key size", testKey(t, 5, 16), ErrAuth},
		{"no key", nil, ErrNeedKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := mustOpen(t, dir, Options{Key: tt.key})
			_, err := d.Load("permall")
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if tt.want == ErrAuth {
				want := "state file " + path + ": authentication failed: wrong key or corrupted file"
				if !strings.HasPrefix(err.Error(), want+"; the file was left untouched (") || !strings.Contains(err.Error(), "wrong key)") {
					t.Errorf("message %q", err)
				}
			}
			if err := d.Store("permall", []byte("overwrite")); err == nil {
				t.Errorf("Store overwrote a file it could not read")
			}
			d.Close()
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Errorf("the state file changed")
			}
		})
	}
}

func TestOpenErrors(t *testing.T) {
	base := t.TempDir()
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o600)
	tests := []struct {
		name, dir, want string
	}{
		{"missing", filepath.Join(base, "nope"), "does not exist: create it"},
		{"not a directory", file, "is not a directory"},
	}
	for _, tt := range tests {
		_, err := Open(tt.dir, Options{})
		if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), tt.dir) {
			t.Errorf("%s: %v, want it to name %s and say %q", tt.name, err, tt.dir, tt.want)
		}
	}
	if _, err := Open(base, Options{Key: &Key{b: []byte("short")}}); err == nil {
		t.Errorf("a 5-byte key was accepted")
	}
}

func TestBackup(t *testing.T) {
	dir := t.TempDir()
	key := testKey(t, 7, 32)
	d := mustOpen(t, dir, Options{Key: key, Backup: true})
	for _, v := range []string{"v1", "v2"} {
		if err := d.Store("permall", []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	path := filepath.Join(dir, "tpm2-00.permall")
	os.WriteFile(path, []byte("corrupted by a power cut"), 0o600)

	var logBuf bytes.Buffer
	d = mustOpen(t, dir, Options{Key: key, Backup: true, Log: slog.New(slog.NewTextHandler(&logBuf, nil))})
	got, err := d.Load("permall")
	if err != nil || string(got) != "v1" {
		t.Fatalf("Load = %q, %v; want the backup v1", got, err)
	}
	if !strings.Contains(logBuf.String(), "backup") {
		t.Errorf("no warning about the fallback: %q", logBuf.String())
	}
	if err := d.Store("permall", []byte("v3")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path + ".corrupt"); string(b) != "corrupted by a power cut" {
		t.Errorf("the unreadable file was not kept aside: %q", b)
	}
	if got, _ := d.Load("permall"); string(got) != "v3" {
		t.Errorf("after Store: %q", got)
	}
}

func TestStates(t *testing.T) {
	dir := t.TempDir()
	d := mustOpen(t, dir, Options{})
	if s, err := d.States(); err != nil || len(s) != 0 {
		t.Fatalf("empty dir: %v, %v", s, err)
	}
	d.Store("savestate", []byte("s"))
	d.Store("permall", []byte("pp"))
	s, err := States(dir)
	if err != nil || len(s) != 2 || s[0].Name != "permall" || s[1].Name != "savestate" {
		t.Fatalf("States = %v, %v", s, err)
	}
	if want := int64(envelope.HeaderSize + 6 + 2); s[0].Size != want {
		t.Errorf("permall size %d, want %d", s[0].Size, want)
	}
}

// TestStoreUnchanged: storing the payload a file is known to hold (loaded or stored by
// this Dir, in the format Store writes) leaves the file alone; anything else writes it.
func TestStoreUnchanged(t *testing.T) {
	payload := bytes.Repeat([]byte{7}, 300)
	for _, tt := range []struct {
		name      string
		prepare   func(t *testing.T, dir string) // state the directory holds before Open
		key       *Key
		accept    bool
		load      bool // Load before the Store
		wantWrite bool
	}{
		{name: "stored by this Dir", key: testKey(t, 4, 32), wantWrite: false},
		{name: "stored by this Dir, plaintext", wantWrite: false},
		{name: "loaded, nkp file", key: testKey(t, 4, 32), load: true, wantWrite: false,
			prepare: func(t *testing.T, dir string) { storeIn(t, dir, testKey(t, 4, 32), payload) }},
		{name: "not loaded, nkp file", key: testKey(t, 4, 32), wantWrite: true,
			prepare: func(t *testing.T, dir string) { storeIn(t, dir, testKey(t, 4, 32), payload) }},
		{name: "loaded swtpm plaintext under a key (import)", key: testKey(t, 4, 32), accept: true, load: true, wantWrite: true,
			prepare: func(t *testing.T, dir string) { storeIn(t, dir, nil, payload) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.prepare != nil {
				tt.prepare(t, dir)
			}
			d := mustOpen(t, dir, Options{Key: tt.key, AcceptPlaintext: tt.accept})
			if tt.prepare == nil {
				if err := d.Store("permall", payload); err != nil {
					t.Fatal(err)
				}
			}
			if tt.load {
				if got, err := d.Load("permall"); err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("Load = %x, %v", got, err)
				}
			}
			p := filepath.Join(dir, FileName("permall"))
			before, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Store("permall", payload); err != nil {
				t.Fatal(err)
			}
			after, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			// Store writes a new file and renames it over the old one: a new inode.
			if wrote := !os.SameFile(before, after); wrote != tt.wantWrite {
				t.Errorf("file rewritten = %v, want %v", wrote, tt.wantWrite)
			}
			if got, err := d.Load("permall"); err != nil || !bytes.Equal(got, payload) {
				t.Errorf("Load after Store = %x, %v; want the payload", got, err)
			}
		})
	}
}

// storeIn writes payload as permall into dir with its own Dir, closed again.
func storeIn(t *testing.T, dir string, key *Key, payload []byte) {
	t.Helper()
	d := mustOpen(t, dir, Options{Key: key})
	if err := d.Store("permall", payload); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestSlots: keyed writes after the first overwrite the older slot in place (same
// inode); a payload that outgrows the slots gets a new, larger file; and damaged slots
// are told apart: a torn write (the older slot's authentic header over a new body) or
// damage to an empty slot loads the newest record, a damaged newest record is refused
// unless AcceptRollback, and every damaged slot is counted, logged and kept as evidence
// (the next Store writes a new file).
func TestSlots(t *testing.T) {
	key := testKey(t, 2, 32)
	small := bytes.Repeat([]byte{1}, 100)
	two := [][]byte{small, []byte("two")}
	slot1 := func(f []byte) int { return len(f) / 2 }
	for _, tt := range []struct {
		name     string
		writes   [][]byte
		damage   func(file []byte) // applied to the file after the writes, before Load
		opts     Options
		want     []byte
		wantErr  error
		stats    Stats
		sameFile bool // the last write kept the file (in place)
	}{
		{name: "second write in place", writes: two, want: []byte("two"), sameFile: true},
		{name: "third write in place", writes: [][]byte{small, []byte("two"), []byte("three")}, want: []byte("three"), sameFile: true},
		{name: "newest record damaged: refused", writes: two,
			damage: func(f []byte) { f[slot1(f)+slotHeaderSize] ^= 1 }, wantErr: ErrRollback, sameFile: true},
		{name: "newest header damaged: refused", writes: two,
			damage: func(f []byte) { f[slot1(f)+33] ^= 1 }, wantErr: ErrRollback, sameFile: true},
		{name: "newest record damaged, AcceptRollback: previous record", writes: two, opts: Options{AcceptRollback: true},
			damage: func(f []byte) { f[slot1(f)+slotHeaderSize] ^= 1 }, want: small, stats: Stats{DamagedSlots: 1, Rollbacks: 1}, sameFile: true},
		{name: "torn write over the older slot: newest record", writes: [][]byte{small, []byte("two"), []byte("three")},
			// slot 1 ("two") was being overwritten: its header is still two's, the body half new
			damage: func(f []byte) { f[slot1(f)+slotHeaderSize+1] ^= 0x10 }, want: []byte("three"), stats: Stats{DamagedSlots: 1}, sameFile: true},
		{name: "torn first write into the empty slot", writes: [][]byte{small},
			damage: func(f []byte) { f[slot1(f)+slotHeaderSize+5] = 7 }, want: small, stats: Stats{DamagedSlots: 1}},
		{name: "damaged header bytes of the empty slot", writes: [][]byte{small},
			damage: func(f []byte) { f[slot1(f)+3] = 7 }, want: small, stats: Stats{DamagedSlots: 1}},
		{name: "outgrows the slot: new file", writes: [][]byte{small, bytes.Repeat([]byte{3}, 2*slotAlign)},
			want: bytes.Repeat([]byte{3}, 2*slotAlign), sameFile: false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, FileName("permall"))
			d := mustOpen(t, dir, Options{Key: key})
			var before os.FileInfo
			for i, w := range tt.writes {
				if i == len(tt.writes)-1 {
					before, _ = os.Stat(p)
				}
				if err := d.Store("permall", w); err != nil {
					t.Fatal(err)
				}
			}
			after, _ := os.Stat(p)
			if len(tt.writes) > 1 && os.SameFile(before, after) != tt.sameFile {
				t.Errorf("last write kept the file = %v, want %v", os.SameFile(before, after), tt.sameFile)
			}
			d.Close()
			var damaged []byte
			if tt.damage != nil {
				f, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				tt.damage(f)
				if err := os.WriteFile(p, f, 0o600); err != nil {
					t.Fatal(err)
				}
				damaged = f
			}
			var logBuf bytes.Buffer
			opts := tt.opts
			opts.Key, opts.Log = key, slog.New(slog.NewTextHandler(&logBuf, nil))
			d = mustOpen(t, dir, opts)
			got, err := d.Load("permall")
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), "accept-rollback") {
					t.Fatalf("Load = %v, want %v with its way out", err, tt.wantErr)
				}
				if err := d.Store("permall", []byte("x")); err == nil {
					t.Fatalf("Store overwrote a refused file")
				}
				if now, _ := os.ReadFile(p); !bytes.Equal(now, damaged) {
					t.Fatalf("the refused file changed")
				}
				return
			}
			if err != nil || !bytes.Equal(got, tt.want) {
				t.Fatalf("Load = %.20q (%d bytes), %v; want %.20q", got, len(got), err, tt.want)
			}
			if s := d.Stats(); s != tt.stats {
				t.Errorf("Stats = %+v, want %+v", s, tt.stats)
			}
			evidence, _ := filepath.Glob(p + ".damaged.*")
			if tt.stats.DamagedSlots > 0 {
				for _, want := range []string{"slot=1", "loaded_slot=0", "evidence=" + p + ".damaged."} {
					if !strings.Contains(logBuf.String(), want) {
						t.Errorf("log lacks %q:\n%s", want, logBuf.String())
					}
				}
				if want := fmt.Sprintf("%s=%d %s=%d", LogMetricRollbacks, tt.stats.Rollbacks, LogMetricDamagedSlots, tt.stats.DamagedSlots); !strings.Contains(logBuf.String(), want) {
					t.Errorf("log lacks the counts %q:\n%s", want, logBuf.String())
				}
				if tt.stats.Rollbacks > 0 && !strings.Contains(logBuf.String(), "level=ERROR") {
					t.Errorf("a rollback was not logged as an error:\n%s", logBuf.String())
				}
				if len(evidence) != 1 {
					t.Fatalf("evidence files: %v", evidence)
				}
			} else if len(evidence) != 0 {
				t.Errorf("evidence kept without damage: %v", evidence)
			}
			// A Store after that Load goes in place again (or, after damage, writes a new
			// file and leaves the evidence as it was) and reads back.
			st, _ := os.Stat(p)
			if err := d.Store("permall", []byte("after load")); err != nil {
				t.Fatal(err)
			}
			if st2, _ := os.Stat(p); os.SameFile(st, st2) != (tt.stats.DamagedSlots == 0) {
				t.Errorf("the Store after Load kept the file = %v", os.SameFile(st, st2))
			}
			if len(evidence) == 1 {
				if ev, _ := os.ReadFile(evidence[0]); !bytes.Equal(ev, damaged) {
					t.Errorf("the evidence changed")
				}
			}
			if got, err := d.Load("permall"); err != nil || string(got) != "after load" {
				t.Errorf("Load after Store = %q, %v", got, err)
			}
		})
	}
}

// TestVersion1File: a state file of format version 1 (nkp-swtpm before the slots) loads,
// and the next Store replaces it with a version 2 file that loads back.
func TestVersion1File(t *testing.T) {
	key := testKey(t, 6, 32)
	s, err := newSealer(key.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	v1, err := s.seal(blobTypes["permall"], []byte("state of version 1"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, FileName("permall"))
	if err := os.WriteFile(p, v1, 0o600); err != nil {
		t.Fatal(err)
	}
	d := mustOpen(t, dir, Options{Key: key})
	if got, err := d.Load("permall"); err != nil || string(got) != "state of version 1" {
		t.Fatalf("Load of a version 1 file = %q, %v", got, err)
	}
	if err := d.Store("permall", []byte("state of version 1")); err != nil {
		t.Fatal(err)
	}
	f, _ := os.ReadFile(p)
	if len(f) < 9 || f[8] != fileVersionBound {
		t.Fatalf("after Store the file is not version 3: % x", f[:min(len(f), 10)])
	}
	if got, err := d.Load("permall"); err != nil || string(got) != "state of version 1" {
		t.Errorf("Load after rewrite = %q, %v", got, err)
	}
}
