package vm

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

func (m *Manager) procDir() string { return m.cfg.ProcDir }

// opener is a process that has a file open.
type opener struct {
	PID  int
	Comm string // /proc/PID/comm, "" if unreadable
	// Guest is the libvirt domain a QEMU process runs (its -name guest=NAME), "" for
	// other processes.
	Guest string
}

func (o opener) String() string {
	s := "process " + strconv.Itoa(o.PID)
	if o.Comm != "" {
		s += " (" + o.Comm + ")"
	}
	if o.Guest != "" {
		s = fmt.Sprintf("domain %s's QEMU (%s)", o.Guest, s)
	}
	return s
}

// guestName reads libvirt's "-name guest=NAME,…" from a QEMU command line (NUL-separated
// arguments; a comma in the name is written ",,").
func guestName(cmdline []byte) string {
	args := strings.Split(string(cmdline), "\x00")
	for i := 0; i+1 < len(args); i++ {
		if args[i] != "-name" || !strings.HasPrefix(args[i+1], "guest=") {
			continue
		}
		v := strings.TrimPrefix(args[i+1], "guest=")
		var b strings.Builder
		for j := 0; j < len(v); j++ {
			if v[j] == ',' {
				if j+1 < len(v) && v[j+1] == ',' {
					b.WriteByte(',')
					j++
					continue
				}
				break
			}
			b.WriteByte(v[j])
		}
		return b.String()
	}
	return ""
}

// openers lists the processes under procDir ("/proc") that have path open, matched by
// device and inode through /proc/PID/fd, so a renamed or hard-linked file is found too.
// Finalize asks before it removes a kept original: a VM resumed from a save image or a
// snapshot made before nkp changed its disks runs on the original file, and removing it
// would lose what that VM writes. A process that ends meanwhile is skipped; an unreadable
// procDir is an error (the caller keeps the file).
func openers(procDir, path string) ([]opener, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	want, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, fmt.Errorf("%s: no device and inode", path)
	}
	ents, err := os.ReadDir(procDir)
	if err != nil {
		return nil, err
	}
	var out []opener
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		fdDir := filepath.Join(procDir, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // ended, or a kernel thread
		}
		for _, fd := range fds {
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join(fdDir, fd.Name()), &st) != nil {
				continue
			}
			if st.Dev == want.Dev && st.Ino == want.Ino {
				comm, _ := os.ReadFile(filepath.Join(procDir, e.Name(), "comm"))
				cmdline, _ := os.ReadFile(filepath.Join(procDir, e.Name(), "cmdline"))
				out = append(out, opener{PID: pid, Comm: strings.TrimSpace(string(comm)), Guest: guestName(cmdline)})
				break
			}
		}
	}
	return out, nil
}
