package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/test/e2e"
)

func mustOpenLinear(t testing.TB, path string, opts Options) *Linear {
	t.Helper()
	l, err := OpenLinear(path, opts)
	if err != nil {
		t.Fatalf("OpenLinear: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func linKey(t testing.TB, b byte, n int) *Key {
	t.Helper()
	k, err := NewKey(bytes.Repeat([]byte{b}, n))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Wipe)
	return k
}

// checkLayout asserts the invariants swtpm relies on: a parseable header whose used
// sections are contiguous (each ends where the next begins) and hold their data.
func checkLayout(t *testing.T, path string) layout {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lay, err := parseLayout(b, uint64(len(b)))
	if err != nil {
		t.Fatalf("layout of %s: %v", path, err)
	}
	var used []linearEntry
	for _, e := range lay.entries {
		if e.used() {
			used = append(used, e)
		}
	}
	slices.SortFunc(used, func(a, b linearEntry) int { return int(a.offset) - int(b.offset) })
	for i, e := range used {
		next := e.offset + e.dataLen // the last section holds its data
		if i+1 < len(used) {
			next = used[i+1].offset
		}
		if e.sectionLen < e.dataLen || e.offset+e.sectionLen != next {
			t.Fatalf("sections not contiguous, or shorter than their data: %+v", used)
		}
	}
	if lay.end() > uint64(len(b)) {
		t.Fatalf("sections end at %d, past the file (%d bytes)", lay.end(), len(b))
	}
	return lay
}

// TestLinearRoundTrip stores, reloads, grows, shrinks and deletes blobs, with and
// without a key, reopening the file between steps: every load gives what was stored
// last, the layout stays as swtpm expects it, and a regular file gives space back.
func TestLinearRoundTrip(t *testing.T) {
	for _, tt := range []struct {
		name string
		key  *Key
	}{{"plaintext", nil}, {"aes-256", linKey(t, 7, 32)}, {"aes-128", linKey(t, 8, 16)}} {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "tpm.img")
			opts := Options{Key: tt.key, Mode: 0o600}
			want := map[string][]byte{}
			steps := []struct {
				name string
				size int // -1 deletes
			}{
				{"permall", 3000}, {"volatilestate", 9000}, {"permall", 3100}, {"savestate", 100},
				{"permall", 20000}, {"volatilestate", 500}, {"savestate", -1}, {"permall", 700},
				{"volatilestate", -1}, {"permall", 40000}, {"volatilestate", 12000},
			}
			var sizeAfterBig int64
			for i, s := range steps {
				l := mustOpenLinear(t, p, opts)
				if s.size < 0 {
					if err := l.Delete(s.name); err != nil {
						t.Fatalf("step %d: Delete: %v", i, err)
					}
					delete(want, s.name)
				} else {
					data := bytes.Repeat([]byte{byte(i + 1)}, s.size)
					if err := l.Store(s.name, data); err != nil {
						t.Fatalf("step %d: Store: %v", i, err)
					}
					want[s.name] = data
				}
				l.Close()
				checkLayout(t, p)
				l = mustOpenLinear(t, p, opts)
				for _, n := range Names {
					got, err := l.Load(n)
					switch w, ok := want[n]; {
					case !ok && !errors.Is(err, fs.ErrNotExist):
						t.Fatalf("step %d: Load(%s) of a deleted blob: %v", i, n, err)
					case ok && err != nil:
						t.Fatalf("step %d: Load(%s): %v", i, n, err)
					case ok && !bytes.Equal(got, w):
						t.Fatalf("step %d: Load(%s) gives %d bytes, not what was stored (%d)", i, n, len(got), len(w))
					}
				}
				states, err := l.States()
				if err != nil || len(states) != len(want) {
					t.Fatalf("step %d: States: %v %v, want %d", i, states, err, len(want))
				}
				l.Close()
				fi, _ := os.Stat(p)
				if s.size == 20000 {
					sizeAfterBig = fi.Size()
				}
				if fi.Mode().Perm() != 0o600 {
					t.Fatalf("mode %v", fi.Mode())
				}
			}
			if fi, _ := os.Stat(p); sizeAfterBig == 0 || fi.Size() > 2*sizeAfterBig+80000 {
				t.Errorf("file grew to %d bytes for %d bytes of state", fi.Size(), 52000)
			}
			if tt.key != nil {
				b, _ := os.ReadFile(p)
				if bytes.Contains(b, bytes.Repeat([]byte{11}, 64)) {
					t.Error("the plaintext of an encrypted blob is in the file")
				}
			}
		})
	}
}

// TestLinearSwtpmFixtures: files that swtpm 0.7.1 wrote with backend-uri=file://
// (testdata/swtpm-0.7.1/linear-*, made by make-fixtures.sh) load, permall giving the
// permanent state swtpm handed out over its control channel; a store then keeps them in
// swtpm's layout.
func TestLinearSwtpmFixtures(t *testing.T) {
	for _, tt := range []struct {
		dir string
		key bool
	}{{"linear-plain", false}, {"linear-key256", true}} {
		t.Run(tt.dir, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(fixtures, tt.dir, "linear.img"))
			if err != nil {
				t.Fatal(err)
			}
			ref, err := os.ReadFile(filepath.Join(fixtures, tt.dir, "ref.permall"))
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(t.TempDir(), "linear.img")
			os.WriteFile(p, b, 0o600)
			var opts Options
			if tt.key {
				spec, _ := ParseKeySpec("file=" + filepath.Join(fixtures, "key256.hex"))
				k, err := ParseKey(spec, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer k.Wipe()
				opts.Key = k
			}
			l := mustOpenLinear(t, p, opts)
			perm, err := l.Load("permall")
			if err != nil || !bytes.Equal(perm, ref) {
				t.Fatalf("permall: %v (%d bytes, want the %d of ref.permall)", err, len(perm), len(ref))
			}
			vol, err := l.Load("volatilestate")
			if err != nil || !isLibtpmsBlob(vol, 2) {
				t.Fatalf("volatilestate: %v", err)
			}
			if err := l.Store("permall", append(perm, 1)); err != nil {
				t.Fatal(err)
			}
			l.Close()
			checkLayout(t, p)
			l = mustOpenLinear(t, p, opts)
			if got, err := l.Load("volatilestate"); err != nil || !bytes.Equal(got, vol) {
				t.Fatalf("volatilestate after a store of permall: %v", err)
			}
		})
	}
}

// TestLinearInterruptedStore plays a Store cut at every point before its header write:
// the new blob written where nkp places it (whole, half, or as garbage) over the file as
// it was. The file must still give every blob's previous content: a Store never writes
// over data the header points at.
func TestLinearInterruptedStore(t *testing.T) {
	key := linKey(t, 3, 32)
	dir := t.TempDir()
	p := filepath.Join(dir, "tpm.img")
	l := mustOpenLinear(t, p, Options{Key: key})
	old := map[string][]byte{"permall": bytes.Repeat([]byte{1}, 5000), "volatilestate": bytes.Repeat([]byte{2}, 3000), "savestate": bytes.Repeat([]byte{3}, 100)}
	for _, n := range Names {
		if err := l.Store(n, old[n]); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	for _, n := range Names {
		for _, size := range []int{10, 2900, 3000, 5000, 5100, 9000} {
			before, _ := os.ReadFile(p)
			l := mustOpenLinear(t, p, Options{Key: key})
			if err := l.Store(n, bytes.Repeat([]byte{9}, size)); err != nil {
				t.Fatal(err)
			}
			l.Close()
			after, _ := os.ReadFile(p)
			newLay, _ := parseLayout(after, uint64(len(after)))
			i, _ := linearIndex(n)
			e := newLay.entries[i]
			for _, cut := range []string{"whole", "half", "garbage"} {
				torn := bytes.Clone(before)
				if int(e.end()) > len(torn) {
					torn = append(torn, make([]byte, int(e.end())-len(torn))...)
				}
				blob := after[e.offset:e.end()]
				switch cut {
				case "whole":
					copy(torn[e.offset:], blob)
				case "half":
					copy(torn[e.offset:], blob[:len(blob)/2])
				case "garbage":
					copy(torn[e.offset:], bytes.Repeat([]byte{0xee}, len(blob)))
				}
				tp := filepath.Join(dir, "torn.img")
				os.WriteFile(tp, torn, 0o600)
				tl := mustOpenLinear(t, tp, Options{Key: key})
				for _, m := range Names {
					got, err := tl.Load(m)
					if err != nil || !bytes.Equal(got, old[m]) {
						t.Fatalf("store of %d bytes to %s cut (%s) before its header: %s gives %v (%d bytes)", size, n, cut, m, err, len(got))
					}
				}
				tl.Close()
			}
			os.WriteFile(p, before, 0o600) // the next case starts from the old state
		}
	}
}

// TestLinearRefusals: what OpenLinear and Load refuse, each with a sentence naming the
// file and the way out, and the file left as it was.
func TestLinearRefusals(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.img")
	l := mustOpenLinear(t, good, Options{Key: linKey(t, 1, 32)})
	if err := l.Store("permall", []byte("state")); err != nil {
		t.Fatal(err)
	}
	l.Close()
	goodBytes, _ := os.ReadFile(good)
	write := func(name string, b []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	corrupt := func(off int, v byte) []byte { b := bytes.Clone(goodBytes); b[off] = v; return b }
	overlap := bytes.Clone(goodBytes)
	binary.LittleEndian.PutUint32(overlap[12+12:], binary.LittleEndian.Uint32(overlap[12:])) // volatile at permall's offset
	binary.LittleEndian.PutUint32(overlap[12+16:], 10)
	os.Symlink(good, filepath.Join(dir, "link.img"))
	os.Mkdir(filepath.Join(dir, "adir"), 0o700)

	for _, tt := range []struct {
		name  string
		path  string
		opts  Options
		load  bool // the refusal comes at Load
		wants []string
	}{
		{"symlink", filepath.Join(dir, "link.img"), Options{}, false, []string{"symbolic link", "does not follow"}},
		{"directory", filepath.Join(dir, "adir"), Options{}, false, []string{"adir"}},
		{"open to others", write("others.img", nil, 0o604), Options{}, false, []string{"open to other users", "chmod o-rwx"}},
		{"foreign data", write("foreign.img", bytes.Repeat([]byte("not a TPM "), 100), 0o600), Options{}, false, []string{"no swtpm linear header", "refusing to format"}},
		{"short", write("short.img", []byte("swtpmlin"), 0o600), Options{}, false, []string{"shorter than the linear header", "left untouched"}},
		{"newer version", write("v2.img", corrupt(8, 2), 0o600), Options{}, false, []string{"version 2"}},
		{"header size", write("hs.img", corrupt(10, 0x80), 0o600), Options{}, false, []string{"header size"}},
		{"past the end", write("end.img", goodBytes[:len(goodBytes)-1], 0o600), Options{}, false, []string{"runs past the end", "left untouched"}},
		{"overlap", write("overlap.img", overlap, 0o600), Options{}, false, []string{"overlap"}},
		{"backup", write("backup.img", nil, 0o600), Options{Backup: true}, false, []string{"directory backend"}},
		{"wrong key", write("wrongkey.img", goodBytes, 0o600), Options{Key: linKey(t, 2, 32)}, true, []string{"authentication failed", "permall", "left untouched"}},
		{"no key", write("nokey.img", goodBytes, 0o600), Options{}, true, []string{"pass the state key"}},
		{"damaged blob", write("damaged.img", corrupt(len(goodBytes)-40, goodBytes[len(goodBytes)-40]^1), 0o600), Options{Key: linKey(t, 1, 32)}, true, []string{"authentication failed"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := os.ReadFile(tt.path)
			l, err := OpenLinear(tt.path, tt.opts)
			if err == nil && tt.load {
				defer l.Close()
				_, err = l.Load("permall")
				if err != nil {
					// A blob that could not be read is never overwritten.
					if serr := l.Store("permall", []byte("x")); serr == nil || !strings.Contains(serr.Error(), "not overwritten") {
						t.Errorf("Store after a failed Load: %v", serr)
					}
				}
			} else if err == nil {
				l.Close()
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range append(tt.wants, tt.path) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if after, _ := os.ReadFile(tt.path); !bytes.Equal(before, after) {
				t.Error("the refused file changed")
			}
		})
	}
}

// TestLinearFormat: an empty file and a zeroed one (a fresh block device) are formatted
// as swtpm would (version 1, header size 192, no entries).
func TestLinearFormat(t *testing.T) {
	dir := t.TempDir()
	for _, init := range [][]byte{nil, make([]byte, 4096)} {
		p := filepath.Join(dir, "new.img")
		os.Remove(p)
		if init != nil {
			os.WriteFile(p, init, 0o600)
		}
		l := mustOpenLinear(t, p, Options{})
		if _, err := l.Load("permall"); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Load on a new file: %v", err)
		}
		l.Close()
		b, _ := os.ReadFile(p)
		if string(b[:8]) != "nilmptws" || b[8] != 1 || binary.LittleEndian.Uint16(b[10:]) != 192 || !bytes.Equal(b[12:192], make([]byte, 180)) {
			t.Fatalf("formatted header: % x", b[:32])
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != DefaultMode && init == nil {
			t.Errorf("new file mode %v, want %v", fi.Mode().Perm(), DefaultMode)
		}
	}
}

// TestLinearLock: a second OpenLinear of the same file, in this process, is refused
// with ErrLocked until the first closes; ReleaseLock lets it in and stops the first
// one's writes; LockStorage takes the lock back once the second is gone.
func TestLinearLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tpm.img")
	a := mustOpenLinear(t, p, Options{})
	if _, err := OpenLinear(p, Options{}); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second OpenLinear: %v", err)
	}
	if err := a.ReleaseLock(); err != nil {
		t.Fatal(err)
	}
	if err := a.Store("permall", []byte("x")); !errors.Is(err, ErrLockReleased) {
		t.Fatalf("Store after ReleaseLock: %v", err)
	}
	b := mustOpenLinear(t, p, Options{})
	if err := b.Store("permall", []byte("from b")); err != nil {
		t.Fatal(err)
	}
	if err := a.LockStorage(t.Context(), 2); !errors.Is(err, ErrLocked) {
		t.Fatalf("LockStorage while b holds it: %v", err)
	}
	b.Close()
	if err := a.LockStorage(t.Context(), 2); err != nil {
		t.Fatal(err)
	}
	if got, err := a.Load("permall"); err != nil || string(got) != "from b" {
		t.Fatalf("after LockStorage: %q %v", got, err)
	}
}

// TestLinearStates: LinearStates reports the blobs and their stored sizes without
// locking, and nothing for a missing or new file.
func TestLinearStates(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tpm.img")
	if s, err := LinearStates(p); err != nil || len(s) != 0 {
		t.Fatalf("missing file: %v %v", s, err)
	}
	l := mustOpenLinear(t, p, Options{})
	l.Store("volatilestate", []byte("vol"))
	s, err := LinearStates(p) // while l holds the lock
	if err != nil || len(s) != 1 || s[0].Name != "volatilestate" || s[0].Size <= 3 {
		t.Fatalf("LinearStates: %+v %v", s, err)
	}
}

// TestLinearSkipsUnchanged: a Store of the payload just loaded writes nothing.
func TestLinearSkipsUnchanged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tpm.img")
	l := mustOpenLinear(t, p, Options{Key: linKey(t, 4, 32)})
	l.Store("permall", []byte("same"))
	before, _ := os.ReadFile(p)
	got, _ := l.Load("permall")
	if err := l.Store("permall", got); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
		t.Error("an unchanged Store rewrote the file")
	}
}

// TestLinearBlockDevice runs the linear file on a loop block device (root only): blobs
// store and reload, real swtpm initialises its TPM from what nkp wrote, and a device too
// small for a blob twice refuses the store, naming the way out, with the old blob kept.
func TestLinearBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	e2e.Require(t, "losetup")
	img := filepath.Join(t.TempDir(), "dev.img")
	if err := os.WriteFile(img, make([]byte, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", img).Output()
	if err != nil {
		t.Skipf("no loop device: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	os.Chmod(dev, 0o660)

	ref, err := os.ReadFile(filepath.Join(fixtures, "linear-plain", "ref.permall"))
	if err != nil {
		t.Fatal(err)
	}
	l := mustOpenLinear(t, dev, Options{Mode: 0o600})
	for _, s := range []int{9000, 3000, 20000} {
		if err := l.Store("volatilestate", bytes.Repeat([]byte{byte(s)}, s)); err != nil {
			t.Fatalf("Store %d bytes: %v", s, err)
		}
	}
	if err := l.Store("permall", ref); err != nil {
		t.Fatal(err)
	}
	err = l.Store("volatilestate", bytes.Repeat([]byte{1}, 40000))
	if err == nil || !strings.Contains(err.Error(), "larger device") {
		t.Fatalf("a store the device cannot hold twice: %v", err)
	}
	if got, err := l.Load("volatilestate"); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{byte(20000 % 256)}, 20000)) {
		t.Fatalf("the previous blob after a refused store: %v", err)
	}
	if err := l.Delete("volatilestate"); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if fi, _ := os.Stat(dev); fi.Mode().Perm() != 0o660 {
		t.Errorf("the device node's mode changed to %v", fi.Mode().Perm())
	}

	if _, err := exec.LookPath("swtpm"); err == nil {
		if got := swtpmPermall(t, []string{"socket", "--tpm2", "--tpmstate", "backend-uri=file://" + dev}); !bytes.Equal(got, ref) {
			t.Errorf("swtpm's permanent state from the device (%d bytes) differs from what nkp stored (%d)", len(got), len(ref))
		}
	}
}
