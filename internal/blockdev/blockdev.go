// Package blockdev tells which block devices stand under a file, so that nkp can refuse to
// encrypt a disk image twice: LUKS inside an image whose file already sits on dm-crypt
// costs CPU on every request and defeats deduplication for no gain (vSphere's rule "don't
// mix encryption technologies").
//
// It reads sysfs, not the devices: a file's device number leads to /sys/dev/block/MAJ:MIN;
// a partition leads to its disk; device-mapper devices (dm-crypt, LVM, multipath) and md
// RAID lead to the devices in their slaves/ directory; a loop device leads to the file
// behind it, and on down. A dm device whose dm/uuid starts with "CRYPT-" (what cryptsetup
// and systemd-cryptsetup make, LUKS or plain) is dm-crypt. Filesystems with no block device
// of their own (tmpfs, NFS, overlay, btrfs' anonymous device numbers) are looked up in
// mountinfo by their source; what has no local block device has an empty stack.
//
// Who may import it: hostd. Standard library and golang.org/x/sys/unix only.
package blockdev

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Layer is one block device in the stack under a file.
type Layer struct {
	Dev    string // "MAJ:MIN"
	Name   string // kernel name: "sda1", "dm-0", "loop3", "md0"
	DMName string // device-mapper name (e.g. "luks-3f1c…", "vg-root"), if a dm device
	DMUUID string // device-mapper uuid (e.g. "CRYPT-LUKS2-…-luks-…"), if a dm device
	Crypt  bool   // a dm-crypt device
}

// System is where sysfs and mountinfo are read; the zero value is the running system.
type System struct {
	Sys       string // sysfs root; "" means "/sys"
	MountInfo string // mountinfo file; "" means "/proc/self/mountinfo"
}

const maxDepth = 16

func (s System) sys() string {
	if s.Sys == "" {
		return "/sys"
	}
	return s.Sys
}

func (s System) mountInfo() string {
	if s.MountInfo == "" {
		return "/proc/self/mountinfo"
	}
	return s.MountInfo
}

// Stack returns the block devices under the filesystem that holds path, top first.
func (s System) Stack(path string) ([]Layer, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("block devices under %s: %w", path, err)
	}
	maj, min := unix.Major(st.Dev), unix.Minor(st.Dev)
	if maj == 0 {
		// An anonymous device: the filesystem's mount source names its block device, if any.
		src, err := s.mountSource(fmt.Sprintf("%d:%d", maj, min))
		if err != nil {
			return nil, fmt.Errorf("block devices under %s: %w", path, err)
		}
		var bst unix.Stat_t
		if src == "" || !strings.HasPrefix(src, "/dev/") || unix.Stat(src, &bst) != nil || bst.Mode&unix.S_IFMT != unix.S_IFBLK {
			return nil, nil
		}
		maj, min = unix.Major(bst.Rdev), unix.Minor(bst.Rdev)
	}
	return s.StackOf(fmt.Sprintf("%d:%d", maj, min))
}

// Encrypted returns the first dm-crypt device under path, if any.
func (s System) Encrypted(path string) (Layer, bool, error) {
	st, err := s.Stack(path)
	if err != nil {
		return Layer{}, false, err
	}
	for _, l := range st {
		if l.Crypt {
			return l, true, nil
		}
	}
	return Layer{}, false, nil
}

// StackOf returns the stack from the block device MAJ:MIN down.
func (s System) StackOf(dev string) ([]Layer, error) {
	var out []Layer
	seen := map[string]bool{}
	var walk func(dir string, depth int) error
	walk = func(dir string, depth int) error {
		if depth > maxDepth {
			return fmt.Errorf("block device stack deeper than %d at %s: a loop in sysfs?", maxDepth, dir)
		}
		real, err := filepath.EvalSymlinks(dir)
		if err != nil {
			return fmt.Errorf("block device %s: %w", dir, err)
		}
		if seen[real] {
			return nil
		}
		seen[real] = true
		l := Layer{Dev: readTrim(filepath.Join(real, "dev")), Name: filepath.Base(real)}
		if u := readTrim(filepath.Join(real, "dm", "uuid")); u != "" || exists(filepath.Join(real, "dm")) {
			l.DMUUID, l.DMName = u, readTrim(filepath.Join(real, "dm", "name"))
			l.Crypt = strings.HasPrefix(u, "CRYPT-")
		}
		out = append(out, l)
		if exists(filepath.Join(real, "partition")) {
			return walk(filepath.Dir(real), depth+1)
		}
		if bf := readTrim(filepath.Join(real, "loop", "backing_file")); bf != "" {
			st, err := s.Stack(strings.TrimSuffix(bf, " (deleted)"))
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			out = append(out, st...)
		}
		ents, err := os.ReadDir(filepath.Join(real, "slaves"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("block device %s: %w", l.Name, err)
		}
		for _, e := range ents {
			if err := walk(filepath.Join(real, "slaves", e.Name()), depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(filepath.Join(s.sys(), "dev", "block", dev), 0); err != nil {
		return nil, err
	}
	return out, nil
}

// mountSource returns the source of the mount whose device is dev ("" if none is).
func (s System) mountSource(dev string) (string, error) {
	f, err := os.Open(s.mountInfo())
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, after := strings.Fields(pre), strings.Fields(post)
		if !ok || len(fields) < 3 || len(after) < 2 || fields[2] != dev {
			continue
		}
		return unescape(after[1]), nil
	}
	return "", sc.Err()
}

// unescape undoes mountinfo's octal escapes (\040 for a space, …).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			var v byte
			ok := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + c - '0'
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func readTrim(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
