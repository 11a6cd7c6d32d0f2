package qemuimg_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/qemuimg"
	"github.com/nkp-dev/nkp/test/e2e"
)

// key returns a fresh passphrase as nkp's host daemon makes them: the hex of 32 random bytes.
func key(t testing.TB) []byte {
	var b [32]byte
	rand.Read(b[:])
	return []byte(hex.EncodeToString(b[:]))
}

func tool(t testing.TB) *qemuimg.Tool {
	e2e.Require(t, "qemu-img", "qemu-io")
	return &qemuimg.Tool{}
}

// qemuIO runs qemu-io commands on an image opened through --image-opts (key by fd 3).
func qemuIO(t testing.TB, img qemuimg.Image, cmds ...string) string {
	t.Helper()
	args := []string{}
	opts := fmt.Sprintf("driver=%s,file.filename=%s", img.Format, img.Path)
	var extra []*os.File
	if len(img.Key) > 0 {
		f := filepath.Join(t.TempDir(), "k")
		if err := os.WriteFile(f, img.Key, 0o600); err != nil {
			t.Fatal(err)
		}
		kf, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		defer kf.Close()
		extra = append(extra, kf)
		args = append(args, "--object", "secret,id=k,file=/dev/fd/3")
		if img.Format == qemuimg.LUKS {
			opts += ",key-secret=k"
		} else {
			opts += ",encrypt.key-secret=k"
		}
	}
	args = append(args, "--image-opts", opts)
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	cmd := exec.Command("qemu-io", args...)
	cmd.ExtraFiles = extra
	out, err := cmd.CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
	}
	return string(out)
}

func fileHash(t testing.TB, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// marker is a recognisable 4 KiB pattern (0x6e 'n' … ) that qemu-io writes with -P.
const markerByte = 0x6e

func hasMarkerRun(t testing.TB, p string) bool {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Contains(b, bytes.Repeat([]byte{markerByte}, 512))
}

func TestCreateInfoFastUnlock(t *testing.T) {
	qi, ctx, dir := tool(t), context.Background(), t.TempDir()
	for _, f := range []qemuimg.Format{qemuimg.QCOW2, qemuimg.LUKS} {
		t.Run(string(f), func(t *testing.T) {
			img := qemuimg.Image{Path: filepath.Join(dir, "new."+string(f)), Format: f, Key: key(t)}
			if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 32 << 20}); err != nil {
				t.Fatal(err)
			}
			info, err := qi.Info(ctx, img)
			if err != nil {
				t.Fatal(err)
			}
			if info.Format != f || info.VirtualSize != 32<<20 || !info.Encrypted || info.LUKS == nil {
				t.Fatalf("info = %+v", info)
			}
			l := info.LUKS
			if l.CipherAlg != "aes-256" || l.CipherMode != "xts" || l.ActiveSlots() != 1 {
				t.Errorf("LUKS header = %+v, want aes-256 xts with one active slot", l)
			}
			// QEMU's default (2 s) gives hundreds of thousands of iterations here; nkp's
			// minimal setting must stay far below.
			if it := l.Slots[0].Iters; it <= 0 || it > 200000 {
				t.Errorf("keyslot iterations = %d, want the minimal setting (> 0, ≤ 200000)", it)
			}
			start := time.Now()
			qemuIO(t, img, "read 0 4k")
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("opening the image took %v (QEMU's default PBKDF takes ~2 s; nkp's must not)", d)
			}
			// Info without the key still shows the header.
			noKey := img
			noKey.Key = nil
			if img.Format == qemuimg.QCOW2 {
				if i, err := qi.Info(ctx, noKey); err != nil || !i.Encrypted {
					t.Errorf("info without key: %+v, %v", i, err)
				}
			}
		})
	}
}

func TestConvertEncryptsWithProgressAndCompares(t *testing.T) {
	qi, ctx, dir := tool(t), context.Background(), t.TempDir()
	src := qemuimg.Image{Path: filepath.Join(dir, "plain.raw"), Format: qemuimg.Raw}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: src, Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, src, fmt.Sprintf("write -P %d 0 1M", markerByte), fmt.Sprintf("write -P %d 40M 64k", markerByte))
	before := fileHash(t, src.Path)
	if !hasMarkerRun(t, src.Path) {
		t.Fatal("the plain source does not hold the marker: the test cannot see plaintext")
	}
	for _, f := range []qemuimg.Format{qemuimg.QCOW2, qemuimg.LUKS} {
		t.Run(string(f), func(t *testing.T) {
			dst := qemuimg.Image{Path: filepath.Join(dir, "enc."+string(f)), Format: f, Key: key(t)}
			var reports []float64
			err := qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst, Progress: func(x float64) { reports = append(reports, x) }})
			if err != nil {
				t.Fatal(err)
			}
			if len(reports) < 2 || reports[len(reports)-1] != 1 {
				t.Errorf("progress reports = %v, want several ending in 1", reports)
			}
			for i := 1; i < len(reports); i++ {
				if reports[i] < reports[i-1] {
					t.Errorf("progress went back: %v", reports)
				}
			}
			if err := qi.Compare(ctx, src, dst); err != nil {
				t.Fatalf("compare plain vs encrypted: %v", err)
			}
			if hasMarkerRun(t, dst.Path) {
				t.Error("the encrypted image holds the guest's plaintext marker")
			}
			wrong := dst
			wrong.Key = key(t)
			err = qi.Compare(ctx, src, wrong)
			if !errors.Is(err, qemuimg.ErrWrongKey) || !strings.Contains(err.Error(), dst.Path) {
				t.Errorf("compare with a wrong key: %v, want ErrWrongKey naming %s", err, dst.Path)
			}
			// A difference is found, and said where.
			qemuIO(t, dst, "write -P 1 8M 4k")
			if err := qi.Compare(ctx, src, dst); !errors.Is(err, qemuimg.ErrDiffer) {
				t.Errorf("compare after a write: %v, want ErrDiffer", err)
			}
		})
	}
	if fileHash(t, src.Path) != before {
		t.Error("the source changed")
	}
}

func TestConvertFlattensBackingChain(t *testing.T) {
	qi, ctx, dir := tool(t), context.Background(), t.TempDir()
	base := qemuimg.Image{Path: filepath.Join(dir, "base.raw"), Format: qemuimg.Raw}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: base, Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, base, "write -P 7 0 1M")
	top := qemuimg.Image{Path: filepath.Join(dir, "top.qcow2"), Format: qemuimg.QCOW2}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: top, Backing: &base}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, top, "write -P 9 512k 1M")
	chain, err := qi.Chain(ctx, top)
	if err != nil || len(chain) != 2 || chain[0].BackingFormat != "raw" {
		t.Fatalf("chain = %+v, %v; want top and base with backing format raw", chain, err)
	}
	dst := qemuimg.Image{Path: filepath.Join(dir, "flat.qcow2"), Format: qemuimg.QCOW2, Key: key(t)}
	if err := qi.Convert(ctx, qemuimg.ConvertOptions{Src: top, Dst: dst, OutOfOrder: true}); err != nil {
		t.Fatal(err)
	}
	c2, err := qi.Chain(ctx, dst)
	if err != nil || len(c2) != 1 || c2[0].BackingFilename != "" {
		t.Fatalf("converted chain = %+v, %v; want one standalone image", c2, err)
	}
	if err := qi.Compare(ctx, top, dst); err != nil {
		t.Fatal(err)
	}
	if out := qemuIO(t, dst, "read -P 7 0 512k", "read -P 9 512k 1M"); strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("data of the chain not kept:\n%s", out)
	}
}

func TestKeyslotRotation(t *testing.T) {
	qi, ctx, dir := tool(t), context.Background(), t.TempDir()
	for _, f := range []qemuimg.Format{qemuimg.QCOW2, qemuimg.LUKS} {
		t.Run(string(f), func(t *testing.T) {
			oldK, newK := key(t), key(t)
			img := qemuimg.Image{Path: filepath.Join(dir, "rot."+string(f)), Format: f, Key: oldK}
			if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 8 << 20}); err != nil {
				t.Fatal(err)
			}
			qemuIO(t, img, "write -P 5 0 64k")
			if err := qi.AddKey(ctx, img, newK, qemuimg.LUKSOptions{}); err != nil {
				t.Fatal(err)
			}
			withNew := img
			withNew.Key = newK
			// Between the two steps both keys open the image (a crash there loses nothing).
			qemuIO(t, img, "read -P 5 0 64k")
			qemuIO(t, withNew, "read -P 5 0 64k")
			if i, _ := qi.Info(ctx, withNew); i == nil || i.LUKS.ActiveSlots() != 2 {
				t.Fatalf("after AddKey: %+v, want 2 active slots", i)
			}
			// Removing with a key that opens nothing is refused and changes nothing.
			stranger := img
			stranger.Key = key(t)
			if err := qi.RemoveKey(ctx, stranger, oldK); !errors.Is(err, qemuimg.ErrWrongKey) {
				t.Errorf("RemoveKey opened with a wrong key: %v, want ErrWrongKey", err)
			}
			if err := qi.RemoveKey(ctx, withNew, oldK); err != nil {
				t.Fatal(err)
			}
			if i, _ := qi.Info(ctx, withNew); i == nil || i.LUKS.ActiveSlots() != 1 {
				t.Fatalf("after RemoveKey: %+v, want 1 active slot", i)
			}
			if err := qi.Compare(ctx, img, withNew); !errors.Is(err, qemuimg.ErrWrongKey) {
				t.Errorf("old key after removal: %v, want ErrWrongKey", err)
			}
			if err := qi.Compare(ctx, withNew, withNew); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	qi, ctx, dir := tool(t), context.Background(), t.TempDir()
	img := qemuimg.Image{Path: filepath.Join(dir, "c.qcow2"), Format: qemuimg.QCOW2, Key: key(t)}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, img, "write -P 3 0 1M")
	rep, err := qi.Check(ctx, img)
	if err != nil || rep.Corruptions != 0 || rep.CheckErrors != 0 || rep.ImageEndOffset == 0 {
		t.Fatalf("check = %+v, %v", rep, err)
	}
	// Corrupt the refcount table pointer region: qemu-img must report it, not succeed.
	b, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	// qcow2 header: l1_table_offset at byte 40 (8 bytes). Point it into the header.
	copy(b[40:48], []byte{0, 0, 0, 0, 0, 0, 0x02, 0x00})
	if err := os.WriteFile(img.Path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := qi.Check(ctx, img); err == nil {
		t.Fatal("check of a corrupted image succeeded")
	}
}

func TestSecretsNeverInArgvOrEnv(t *testing.T) {
	tool(t)
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rec := filepath.Join(dir, "rec")
	wrapper := filepath.Join(dir, "qemu-img")
	script := fmt.Sprintf("#!/bin/sh\n{ printf '%%s\\n' \"$@\"; env; } >> %s\nexec %s \"$@\"\n", rec, real)
	if err := os.WriteFile(wrapper, []byte(script), 0o700); err != nil {
		t.Fatal(err)
	}
	qi, ctx := &qemuimg.Tool{Path: wrapper}, context.Background()
	k1, k2 := key(t), key(t)
	src := qemuimg.Image{Path: filepath.Join(dir, "s.raw"), Format: qemuimg.Raw}
	dst := qemuimg.Image{Path: filepath.Join(dir, "d.qcow2"), Format: qemuimg.QCOW2, Key: k1}
	steps := []func() error{
		func() error { return qi.Create(ctx, qemuimg.CreateOptions{Image: src, Size: 1 << 20}) },
		func() error { return qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst}) },
		func() error { return qi.AddKey(ctx, dst, k2, qemuimg.LUKSOptions{}) },
		func() error { _, err := qi.Info(ctx, dst); return err },
		func() error { return qi.Compare(ctx, src, dst) },
	}
	for i, s := range steps {
		if err := s(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	got, err := os.ReadFile(rec)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got, []byte("file=/dev/fd/3")) {
		t.Fatalf("the wrapper saw no secret fd: the test is not looking at the calls\n%s", got)
	}
	for _, k := range [][]byte{k1, k2} {
		if bytes.Contains(got, k) || bytes.Contains(got, k[:16]) {
			t.Fatalf("a key reached qemu-img's argv or environment:\n%s", got)
		}
	}
	// No file is left behind but the images and the record.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		switch e.Name() {
		case "rec", "qemu-img", "s.raw", "d.qcow2":
		default:
			t.Errorf("left behind: %s", e.Name())
		}
	}
}

// holds reports whether process pid has path open.
func holds(pid int, path string) bool {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, e := range ents {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); l == path {
			return true
		}
	}
	return false
}

func TestLockedImage(t *testing.T) {
	qi, ctx, dir := tool(t), context.Background(), t.TempDir()
	img := qemuimg.Image{Path: filepath.Join(dir, "busy.qcow2"), Format: qemuimg.QCOW2, Key: key(t)}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	holdOpen(t, img)
	err := qi.AddKey(ctx, img, key(t), qemuimg.LUKSOptions{})
	if !errors.Is(err, qemuimg.ErrLocked) || !strings.Contains(err.Error(), "shut it off") {
		t.Fatalf("amend of an image in use: %v, want ErrLocked with a way out", err)
	}
}

// TestRemoveKeyWhileChecked: a shallow rekey's RemoveKey is not refused while hostd's
// image check (Unlock: qemu-img map -U, read-only with force-share) has the image
// open; an opener without -U took a shared lock that made amend fail with ErrLocked and
// left two keyslots.
func TestRemoveKeyWhileChecked(t *testing.T) {
	qi, ctx := tool(t), context.Background()
	k1, k2 := key(t), key(t)
	img := qemuimg.Image{Path: filepath.Join(t.TempDir(), "checked.qcow2"), Format: qemuimg.QCOW2, Key: k1}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := qi.AddKey(ctx, img, k2, qemuimg.LUKSOptions{}); err != nil {
		t.Fatal(err)
	}
	holdOpen(t, img, "-U", "-r") // the check in flight, under the old key
	img.Key = k2
	if err := qi.RemoveKey(ctx, img, k1); err != nil {
		t.Fatalf("RemoveKey while the image is checked: %v", err)
	}
	if err := qi.Unlock(ctx, img); err != nil {
		t.Errorf("the new key after RemoveKey: %v", err)
	}
	img.Key = k1
	if err := qi.Unlock(ctx, img); !errors.Is(err, qemuimg.ErrWrongKey) {
		t.Errorf("the removed key after RemoveKey: %v, want ErrWrongKey", err)
	}
}

func TestNoSpaceLeavesSourceAlone(t *testing.T) {
	qi, ctx := tool(t), context.Background()
	e2e.RequireRoot(t)
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	os.Mkdir(small, 0o700)
	if err := syscall.Mount("tmpfs", small, "tmpfs", 0, "size=4m"); err != nil {
		e2e.Unavailable(t, "cannot mount a small tmpfs: "+err.Error())
	}
	defer syscall.Unmount(small, syscall.MNT_DETACH)
	src := qemuimg.Image{Path: filepath.Join(dir, "big.raw"), Format: qemuimg.Raw}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: src, Size: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, src, "write -P 9 0 16M")
	before := fileHash(t, src.Path)
	dst := qemuimg.Image{Path: filepath.Join(small, "enc.qcow2"), Format: qemuimg.QCOW2, Key: key(t)}
	err := qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst})
	if !errors.Is(err, qemuimg.ErrNoSpace) || !strings.Contains(err.Error(), "free space") {
		t.Fatalf("convert onto a full filesystem: %v, want ErrNoSpace with a way out", err)
	}
	if fileHash(t, src.Path) != before {
		t.Fatal("the source changed")
	}
}

func TestCancel(t *testing.T) {
	qi, dir := tool(t), t.TempDir()
	src := qemuimg.Image{Path: filepath.Join(dir, "s.raw"), Format: qemuimg.Raw}
	if err := qi.Create(context.Background(), qemuimg.CreateOptions{Image: src, Size: 256 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, src, "write -P 4 0 128M")
	ctx, cancel := context.WithCancel(context.Background())
	dst := qemuimg.Image{Path: filepath.Join(dir, "d.qcow2"), Format: qemuimg.QCOW2, Key: key(t)}
	err := qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst, Progress: func(f float64) {
		if f > 0 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled convert: %v, want context.Canceled", err)
	}
}

// TestMeasure checks that Measure's figure for a converted image is at least the size
// Convert then writes, for raw LUKS (fully allocated) and LUKS in qcow2 (sparse).
func TestMeasure(t *testing.T) {
	qi := tool(t)
	ctx := context.Background()
	dir := t.TempDir()
	src := qemuimg.Image{Path: filepath.Join(dir, "src.img"), Format: qemuimg.Raw}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: src, Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, src, "write -P 0x5a 0 1M")
	k := key(t)
	for _, f := range []qemuimg.Format{qemuimg.LUKS, qemuimg.QCOW2} {
		m, err := qi.Measure(ctx, src, f, k, qemuimg.LUKSOptions{})
		if err != nil {
			t.Fatal(err)
		}
		dst := qemuimg.Image{Path: filepath.Join(dir, "dst."+string(f)), Format: f, Key: k}
		if err := qi.Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst}); err != nil {
			t.Fatal(err)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(dst.Path, &st); err != nil {
			t.Fatal(err)
		}
		if used := st.Blocks * 512; used > m.Required {
			t.Errorf("%s: measured %d bytes, the converted image uses %d", f, m.Required, used)
		}
		if f == qemuimg.QCOW2 && m.Required >= 8<<20 {
			t.Errorf("qcow2: measured %d for 1 MiB of data: zeros should not count", m.Required)
		}
	}
	if _, err := qi.Measure(ctx, src, qemuimg.LUKS, nil, qemuimg.LUKSOptions{}); err == nil {
		t.Error("Measure for raw LUKS without a key succeeded")
	}
}

// TestUnlock checks that Unlock tells the right key from a wrong one, which qemu-img
// info does not (it opens images without I/O).
func TestUnlock(t *testing.T) {
	qi := tool(t)
	ctx := context.Background()
	k := key(t)
	for _, f := range []qemuimg.Format{qemuimg.LUKS, qemuimg.QCOW2} {
		img := qemuimg.Image{Path: filepath.Join(t.TempDir(), "u."+string(f)), Format: f, Key: k}
		if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		if err := qi.Unlock(ctx, img); err != nil {
			t.Fatalf("%s: right key: %v", f, err)
		}
		img.Key = key(t)
		if _, err := qi.Info(ctx, img); err != nil {
			t.Fatalf("%s: info with another key: %v (it does not check keys)", f, err)
		}
		if err := qi.Unlock(ctx, img); !errors.Is(err, qemuimg.ErrWrongKey) {
			t.Fatalf("%s: wrong key: %v, want ErrWrongKey", f, err)
		}
	}

	// A plain qcow2 image is not "opened" by a key: the domain names a key, so the
	// file must be encrypted.
	plain := qemuimg.Image{Path: filepath.Join(t.TempDir(), "plain.qcow2"), Format: qemuimg.QCOW2}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: plain, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	plain.Key = k
	if err := qi.Unlock(ctx, plain); !errors.Is(err, qemuimg.ErrNotEncrypted) {
		t.Fatalf("plain qcow2 with a key: %v, want ErrNotEncrypted", err)
	}

	// The image of a running VM (held open for writing, with QEMU's locks) can be
	// checked: qemu-io holds the write lock while Unlock runs.
	img := qemuimg.Image{Path: filepath.Join(t.TempDir(), "busy.qcow2"), Format: qemuimg.QCOW2, Key: k}
	if err := qi.Create(ctx, qemuimg.CreateOptions{Image: img, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	holdOpen(t, img)
	if err := qi.Unlock(ctx, img); err != nil {
		t.Fatalf("Unlock of an image in use: %v", err)
	}
}

// holdOpen keeps img open and locked for writing until the test ends, as a running VM
// does: qemu-io reading commands from a pipe, the key on fd 3. flags go before
// qemu-io's other arguments (-U -r: open as Unlock does, read-only with force-share).
func holdOpen(t *testing.T, img qemuimg.Image, flags ...string) {
	t.Helper()
	kf := filepath.Join(t.TempDir(), "k")
	if err := os.WriteFile(kf, img.Key, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(kf)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("qemu-io", append(flags, "--object", "secret,id=k,file=/dev/fd/3", "--image-opts",
		"driver=qcow2,file.filename="+img.Path+",encrypt.key-secret=k")...)
	cmd.ExtraFiles = []*os.File{f}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Wait() })
	e2e.WaitFor(t, 10*time.Second, "qemu-io to open the image", func() bool { return holds(cmd.Process.Pid, img.Path) })
}
