package guest

import (
	"fmt"
	"io"
)

// cpioWriter writes a "newc" cpio archive, the format the kernel unpacks as initramfs.
// Entries carry uid/gid 0 and mtime 0 whoever builds the archive, so the image does not
// depend on the builder's user or clock.
type cpioWriter struct {
	w   io.Writer
	ino uint32
	off int64
	err error
}

const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.off += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// entry writes one header, the name and the data. mode includes the file type bits.
func (c *cpioWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor uint32) error {
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == cpioDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write(append([]byte(name), 0))
	c.pad()
	c.write(data)
	c.pad()
	if c.err != nil {
		return fmt.Errorf("cpio entry %s: %w", name, c.err)
	}
	return nil
}

func (c *cpioWriter) Dir(name string) error { return c.entry(name, cpioDir|0o755, nil, 0, 0) }

func (c *cpioWriter) File(name string, perm uint32, data []byte) error {
	return c.entry(name, cpioFile|perm, data, 0, 0)
}

func (c *cpioWriter) Symlink(name, target string) error {
	return c.entry(name, cpioSymlink|0o777, []byte(target), 0, 0)
}

func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) error {
	return c.entry(name, cpioCharDev|perm, nil, major, minor)
}

// Close writes the trailer. It does not close the underlying writer.
func (c *cpioWriter) Close() error {
	c.ino = 0
	return c.entry("TRAILER!!!", 0, nil, 0, 0)
}
