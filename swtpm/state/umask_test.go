package state

import (
	"os"

	"golang.org/x/sys/unix"
)

func setUmask(m os.FileMode) os.FileMode { return os.FileMode(unix.Umask(int(m))) }
