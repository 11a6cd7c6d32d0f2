package blockdev

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeSys builds a sysfs tree: devices under sys/devices/virtual/block or a disk dir, and
// the /sys/dev/block/MAJ:MIN links that point at them.
type fakeSys struct {
	t    *testing.T
	root string
}

func (f fakeSys) dev(path, dev string, files map[string]string) string {
	d := filepath.Join(f.root, "devices", path)
	if err := os.MkdirAll(d, 0o755); err != nil {
		f.t.Fatal(err)
	}
	files["dev"] = dev
	for name, v := range files {
		p := filepath.Join(d, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			f.t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(f.root, "dev", "block"), 0o755)
	if err := os.Symlink(d, filepath.Join(f.root, "dev", "block", dev)); err != nil {
		f.t.Fatal(err)
	}
	return d
}

func (f fakeSys) slave(upper, lower string) {
	os.MkdirAll(filepath.Join(upper, "slaves"), 0o755)
	if err := os.Symlink(lower, filepath.Join(upper, "slaves", filepath.Base(lower))); err != nil {
		f.t.Fatal(err)
	}
}

func TestStackOf(t *testing.T) {
	f := fakeSys{t, t.TempDir()}
	sda := f.dev("pci0/block/sda", "8:0", map[string]string{})
	sda2 := f.dev("pci0/block/sda/sda2", "8:2", map[string]string{"partition": "2"})
	crypt := f.dev("virtual/block/dm-0", "253:0", map[string]string{"dm/uuid": "CRYPT-LUKS2-3f1c0e0e-luks-3f1c", "dm/name": "luks-3f1c"})
	lvm := f.dev("virtual/block/dm-1", "253:1", map[string]string{"dm/uuid": "LVM-abc", "dm/name": "vg-images"})
	f.slave(crypt, sda2)
	f.slave(lvm, crypt)
	plainLV := f.dev("virtual/block/dm-2", "253:2", map[string]string{"dm/uuid": "LVM-def", "dm/name": "vg-plain"})
	f.slave(plainLV, sda2)
	md := f.dev("virtual/block/md0", "9:0", map[string]string{})
	sdb := f.dev("pci0/block/sdb", "8:16", map[string]string{})
	f.slave(md, sdb)
	f.slave(md, sda)
	_ = sda
	s := System{Sys: f.root}
	tests := []struct {
		dev       string
		wantNames []string
		crypt     string
	}{
		{"8:2", []string{"sda2", "sda"}, ""},
		{"253:0", []string{"dm-0", "sda2", "sda"}, "luks-3f1c"},
		{"253:1", []string{"dm-1", "dm-0", "sda2", "sda"}, "luks-3f1c"}, // LVM on LUKS
		{"253:2", []string{"dm-2", "sda2", "sda"}, ""},                  // LVM on a plain partition
		{"9:0", []string{"md0", "sda", "sdb"}, ""},
	}
	for _, tt := range tests {
		st, err := s.StackOf(tt.dev)
		if err != nil {
			t.Fatalf("%s: %v", tt.dev, err)
		}
		var names []string
		crypt := ""
		for _, l := range st {
			names = append(names, l.Name)
			if l.Crypt {
				crypt = l.DMName
			}
		}
		if len(names) != len(tt.wantNames) {
			t.Errorf("%s: stack %v, want %v", tt.dev, names, tt.wantNames)
			continue
		}
		for i := range names {
			if names[i] != tt.wantNames[i] {
				t.Errorf("%s: stack %v, want %v", tt.dev, names, tt.wantNames)
				break
			}
		}
		if crypt != tt.crypt {
			t.Errorf("%s: crypt layer %q, want %q", tt.dev, crypt, tt.crypt)
		}
	}
	if _, err := s.StackOf("1:99"); err == nil {
		t.Error("an unknown device gave no error")
	}
}

func TestStackLoop(t *testing.T) {
	// A loop device whose backing_file is a file here: the walk continues into that file's
	// own stack (on the real system), and a cycle through slaves is cut.
	f := fakeSys{t, t.TempDir()}
	backing := filepath.Join(t.TempDir(), "img")
	os.WriteFile(backing, nil, 0o600)
	f.dev("virtual/block/loop0", "7:0", map[string]string{"loop/backing_file": backing})
	a := f.dev("virtual/block/dm-5", "253:5", map[string]string{"dm/uuid": "X"})
	b := f.dev("virtual/block/dm-6", "253:6", map[string]string{"dm/uuid": "Y"})
	f.slave(a, b)
	f.slave(b, a)
	s := System{Sys: f.root}
	st, err := s.StackOf("7:0")
	if err != nil || len(st) == 0 || st[0].Name != "loop0" {
		t.Fatalf("loop stack = %+v, %v", st, err)
	}
	if st, err := s.StackOf("253:5"); err != nil || len(st) != 2 {
		t.Fatalf("cyclic stack = %+v, %v; want the two devices once each", st, err)
	}
}

func TestMountSource(t *testing.T) {
	mi := filepath.Join(t.TempDir(), "mountinfo")
	os.WriteFile(mi, []byte("21 26 0:20 / /proc rw - proc proc rw\n"+
		"40 26 0:45 / /var/lib/libvirt/images rw - btrfs /dev/mapper/luks\\040x rw\n"), 0o644)
	s := System{MountInfo: mi}
	if src, err := s.mountSource("0:45"); err != nil || src != "/dev/mapper/luks x" {
		t.Errorf("mountSource = %q, %v", src, err)
	}
	if src, _ := s.mountSource("0:99"); src != "" {
		t.Errorf("unknown device: %q", src)
	}
}

// TestThisMachine reads the real sysfs: the module's own directory is on some local
// filesystem, and what is found must be self-consistent.
func TestThisMachine(t *testing.T) {
	st, err := System{}.Stack(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range st {
		if l.Dev == "" || l.Name == "" {
			t.Errorf("layer without device or name: %+v", l)
		}
	}
	if _, _, err := (System{}).Encrypted(os.TempDir()); err != nil {
		t.Fatal(err)
	}
	t.Logf("stack under .: %+v", st)
}

// TestLoopMount stacks a real ext4 filesystem on a loop device over a file: a file inside
// it must lead to the loop device and on to the device under the backing file.
func TestLoopMount(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for losetup and mount")
	}
	for _, tool := range []string{"losetup", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	if out, err := exec.Command("mkfs.ext4", "-q", loop).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o700)
	if err := unix.Mount(loop, mnt, "ext4", 0, ""); err != nil {
		t.Skipf("mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	f := filepath.Join(mnt, "disk.qcow2")
	os.WriteFile(f, nil, 0o600)
	st, err := System{}.Stack(f)
	if err != nil {
		t.Fatal(err)
	}
	under, err := System{}.Stack(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1+len(under) || st[0].Name != filepath.Base(loop) {
		t.Fatalf("stack under the loop mount = %+v, want %s then %+v", st, filepath.Base(loop), under)
	}
}
