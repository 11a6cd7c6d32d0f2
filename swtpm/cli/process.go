package cli

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// pidFile writes the process id as --pid asks and returns a function that removes a
// pid file again at exit. A file is written crash-safely (temp, fsync, rename).
func pidFile(p *PidOptions, pid int) (func(), error) {
	noop := func() {}
	if p == nil {
		return noop, nil
	}
	data := []byte(strconv.Itoa(pid) + "\n")
	if p.FD >= 0 {
		f := os.NewFile(uintptr(p.FD), "pid")
		defer f.Close()
		fi, err := f.Stat()
		if err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("--pid fd=%d: not an open regular file", p.FD)
		}
		if err := f.Truncate(0); err != nil {
			return nil, fmt.Errorf("--pid fd=%d: truncate: %w", p.FD, err)
		}
		if _, err := f.WriteAt(data, 0); err != nil {
			return nil, fmt.Errorf("--pid fd=%d: write: %w", p.FD, err)
		}
		return noop, nil
	}
	dir := filepath.Dir(p.File)
	tmp, err := os.CreateTemp(dir, ".nkp-swtpm-pid-*")
	if err != nil {
		return nil, fmt.Errorf("--pid file=%s: %w (does the directory exist and is it writable?)", p.File, err)
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), p.File)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("--pid file=%s: %w", p.File, err)
	}
	return func() { os.Remove(p.File) }, nil
}

// runAs switches the process to user name (or numeric uid), its primary group and its
// supplementary groups, as swtpm's --runas does. It needs root.
func runAs(name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr != nil {
			return fmt.Errorf("--runas %s: no such user: %w", name, err)
		}
		if u, err = user.LookupId(name); err != nil {
			return fmt.Errorf("--runas %s: no such uid: %w", name, err)
		}
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	var groups []int
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.Atoi(g); err == nil {
				groups = append(groups, n)
			}
		}
	}
	if len(groups) == 0 {
		groups = []int{gid}
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("--runas %s: setgroups: %w (nkp-swtpm must start as root to change user)", name, err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("--runas %s: setgid %d: %w", name, gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("--runas %s: setuid %d: %w", name, uid, err)
	}
	return nil
}
