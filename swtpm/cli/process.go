package cli

import (
	"errors"
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
	// The digits alone, no newline: byte for byte what swtpm writes.
	data := []byte(strconv.Itoa(pid))
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
	f, err := openNoFollow("--pid file=", p.File, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(0) // only now: the file is known to be a regular file, not a link
	if err == nil {
		_, err = f.Write(data)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("--pid file=%s: %w", p.File, err)
	}
	return func() { os.Remove(p.File) }, nil
}

// openNoFollow opens path for writing as swtpm opens its pid and log files: with
// O_NOFOLLOW, so that a symbolic link planted at the path (by anyone who can write its
// directory) cannot make nkp-swtpm truncate or write another file, and only a regular
// file (a FIFO or device is refused too). flags must not hold O_TRUNC: truncate after.
func openNoFollow(what, path string, flags int, mode os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flags|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, mode)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%s%s is a symbolic link; nkp-swtpm does not follow links here (a planted link would make it overwrite the file it points to): remove the link or give the real path", what, path)
	}
	if errors.Is(err, syscall.ENXIO) { // a FIFO without a reader (O_NONBLOCK keeps the open from hanging)
		return nil, fmt.Errorf("%s%s is not a regular file (a FIFO); give the path of a regular file (it is created if missing)", what, path)
	}
	if err != nil {
		return nil, fmt.Errorf("%s%s: %w (does the directory exist and is it writable?)", what, path, err)
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s%s is not a regular file; give the path of a regular file (it is created if missing)", what, path)
	}
	return f, nil
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
