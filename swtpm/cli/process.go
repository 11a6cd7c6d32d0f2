package cli

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// pidFile writes the process id as --pid asks and returns a function that removes a
// pid file again at exit.
func pidFile(p *cmdline.PidOptions, pid int) (func(), error) {
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
	// Written in place, not renamed over: swtpm_setup creates the file and watches
	// that inode for the pid to appear.
	f, err := os.OpenFile(p.File, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("--pid file=%s: %w (does the directory exist and is it writable?)", p.File, err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
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
