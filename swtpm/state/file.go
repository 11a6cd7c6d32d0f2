package state

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

// Linear is an open, locked linear state file (swtpm's backend-uri=file://): every
// blob of the TPM in one regular file or block device, in swtpm's layout (linear.go),
// each blob in swtpm's format — plaintext, or encrypted with the key as swtpm's --key
// does (AES-CBC + HMAC-SHA256) — so that swtpm 0.7.1 and nkp-swtpm read each other's
// files. Its methods are safe for concurrent use.
//
// Writes are crash-safe and durable without a temp file (a block device cannot be
// renamed): a Store writes the new blob where no entry's data lies, the blob's current
// copy included, fdatasync, and only then the 192-byte header that points at it (one
// write within the first sector), fdatasync. A crash before the header write leaves the
// old header and the old blob; after it, the new ones. A regular file may grow; the
// space behind the last entry is given back by truncation. A block device must be large
// enough for each blob twice.
//
// Unlike the directory backend there are no slots and no state ID: a damaged entry
// fails authentication (swtpm's HMAC) and is refused, the file untouched; Stats stays
// zero.
type Linear struct {
	path     string
	log      *slog.Logger
	noSync   bool
	accept   bool
	blockdev bool
	capacity uint64 // block device size, or how far a regular file may grow

	mu     sync.Mutex // guards everything below
	fd     int        // -1 after Close
	key    []byte     // nil without a key; wiped by Close
	locked bool
	bad    map[string]error
	known  map[string][sha256.Size]byte
	closed bool
}

// linearMaxRegular bounds how far nkp lets a regular linear file grow (a TPM's state is
// tens of KB; the bound stops a runaway, not a real state).
const linearMaxRegular = 256 << 20

// OpenLinear opens (creating a missing regular file with Options.Mode) and locks the
// linear state file at path: a regular file or a block device, never followed through
// a symbolic link. A new file, or one whose first 192 bytes are zero (a fresh device),
// is formatted; anything else without swtpm's linear header is refused, not formatted
// as swtpm would. A file that other users may read or write is refused. Options.Backup
// has no meaning here and is refused; AcceptRollback has nothing to accept (no slots).
func OpenLinear(path string, opts Options) (*Linear, error) {
	if opts.Backup {
		return nil, fmt.Errorf("linear state file %s: backup is an option of the directory backend (swtpm has no backup for file://)", path)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mode := opts.Mode.Perm()
	if mode == 0 {
		mode = DefaultMode
	}
	fd, err := openNoIntr(path, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(mode))
	switch {
	case errors.Is(err, unix.ELOOP):
		return nil, fmt.Errorf("linear state file %s is a symbolic link: nkp-swtpm does not follow links to its state; give the path of the file or device itself", path)
	case err != nil:
		return nil, fmt.Errorf("linear state file %s: %w", path, &fs.PathError{Op: "open", Path: path, Err: err})
	}
	l := &Linear{path: path, log: log, noSync: opts.NoSync, accept: opts.AcceptPlaintext, fd: fd,
		bad: map[string]error{}, known: map[string][sha256.Size]byte{}}
	if err := l.setup(opts, mode); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if k := opts.Key.Bytes(); k != nil {
		l.key = bytes.Clone(k)
	} else {
		log.Warn("TPM state is not encrypted: no --key given; anyone who can read the state file can read the TPM's secrets", "file", path)
	}
	return l, nil
}

func (l *Linear) setup(opts Options, mode fs.FileMode) error {
	var st unix.Stat_t
	if err := unix.Fstat(l.fd, &st); err != nil {
		return fmt.Errorf("linear state file %s: %w", l.path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		l.capacity = linearMaxRegular
		if opts.Mode != 0 {
			if err := unix.Fchmod(l.fd, uint32(mode)); err != nil {
				return fmt.Errorf("linear state file %s: give it mode %#o: %w", l.path, mode, err)
			}
			st.Mode = st.Mode&^0o777 | uint32(mode)
		}
	case unix.S_IFBLK:
		l.blockdev = true
		var size uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(l.fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
			return fmt.Errorf("linear state file %s: the block device's size: %w", l.path, e)
		}
		l.capacity = size
	default:
		return fmt.Errorf("linear state file %s is neither a regular file nor a block device; give backend-uri=file:// one of those", l.path)
	}
	if p := st.Mode & 0o007; p != 0 {
		return fmt.Errorf("linear state file %s is open to other users (mode %#o): anyone on the host could read or replace the TPM's state; chmod o-rwx %s, or pass --tpmstate mode=0600", l.path, st.Mode&0o777, l.path)
	}
	if opts.DeferLock {
		return nil
	}
	if err := l.lockFD(); err != nil {
		return err
	}
	l.locked = true
	_, err := l.layoutLocked()
	return err
}

// lockFD takes the open-file-description write lock on the whole file: it conflicts with
// swtpm's classic fcntl lock (--tpmstate ...,lock) and with a second OpenLinear, in this
// process or another.
func (l *Linear) lockFD() error {
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	err := unix.FcntlFlock(uintptr(l.fd), unix.F_OFD_SETLK, &lk)
	switch {
	case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES):
		return fmt.Errorf("linear state file %s is in use: %w; stop the nkp-swtpm or swtpm that uses it, or give this one its own file", l.path, ErrLocked)
	case err != nil:
		return fmt.Errorf("linear state file %s: lock: %w", l.path, err)
	}
	return nil
}

// size returns the file's or the device's size.
func (l *Linear) size() (uint64, error) {
	if l.blockdev {
		return l.capacity, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(l.fd, &st); err != nil {
		return 0, fmt.Errorf("linear state file %s: %w", l.path, err)
	}
	return uint64(st.Size), nil
}

// layoutLocked reads and parses the header, formatting a new or zeroed file (only with
// the lock held).
func (l *Linear) layoutLocked() (layout, error) {
	size, err := l.size()
	if err != nil {
		return layout{}, err
	}
	hdr := make([]byte, linearHeaderSize)
	n := 0
	if size > 0 {
		if n, err = preadFull(l.fd, hdr, 0); err != nil {
			return layout{}, fmt.Errorf("linear state file %s: read the header: %w", l.path, err)
		}
	}
	lay, err := parseLayout(hdr[:n], size)
	if err == nil {
		return lay, nil
	}
	fresh := size == 0 || (n == linearHeaderSize && bytes.Count(hdr, []byte{0}) == linearHeaderSize)
	if !fresh {
		if errors.Is(err, errNoLinearMagic) {
			return layout{}, fmt.Errorf("linear state file %s has no swtpm linear header (magic \"swtpmlin\") and is not empty: refusing to format what may be other data; give an empty file, or zero its first %d bytes if it is meant for the TPM", l.path, linearHeaderSize)
		}
		return layout{}, fmt.Errorf("linear state file %s: %w; the file was left untouched", l.path, err)
	}
	if !l.locked {
		return layout{}, nil // formatted by whoever takes the lock
	}
	if l.blockdev && l.capacity < 2*linearAlign {
		return layout{}, fmt.Errorf("linear state file %s: the block device has %d bytes; the TPM's state needs tens of KB", l.path, l.capacity)
	}
	var fmtd layout
	if err := l.writeHeader(&fmtd); err != nil {
		return layout{}, err
	}
	l.log.Info("formatted a new linear state file", "file", l.path)
	return fmtd, nil
}

func (l *Linear) writeHeader(lay *layout) error {
	if err := pwriteAll(l.fd, lay.encode(), 0); err != nil {
		return fmt.Errorf("linear state file %s: write the header: %w", l.path, err)
	}
	if err := l.sync(); err != nil {
		return fmt.Errorf("linear state file %s: sync the header: %w", l.path, err)
	}
	return nil
}

func (l *Linear) sync() error {
	if l.noSync {
		return nil
	}
	for {
		err := unix.Fdatasync(l.fd)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// preadFull reads len(b) bytes at off, or fewer at the end of the file.
func preadFull(fd int, b []byte, off int64) (int, error) {
	done := 0
	for done < len(b) {
		n, err := unix.Pread(fd, b[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, err
		}
		if n == 0 {
			break
		}
		done += n
	}
	return done, nil
}

func (l *Linear) index(name string) (int, error) {
	i, ok := linearIndex(name)
	if !ok {
		return 0, fmt.Errorf("linear state file %s: unknown state blob %q (want permall, volatilestate or savestate)", l.path, name)
	}
	return i, nil
}

// Path returns the file's path.
func (l *Linear) Path() string { return l.path }

// Encrypted reports whether the Linear writes encrypted blobs (a key was given).
func (l *Linear) Encrypted() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.key != nil
}

// Stats returns zero counts: the linear file has no slots to pass over (see Dir.Stats).
func (l *Linear) Stats() Stats { return Stats{} }

// Load returns the payload of blob name; when its entry is unused the error wraps
// fs.ErrNotExist. Any other failure leaves the file untouched and makes Store and Delete
// of that name refuse for this Linear's life.
func (l *Linear) Load(name string) ([]byte, error) {
	i, err := l.index(name)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("linear state file %s: closed", l.path)
	}
	delete(l.known, name)
	data, current, err := l.loadLocked(name, i)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		l.bad[name] = err
		return nil, err
	}
	delete(l.bad, name)
	if current {
		l.known[name] = sha256.Sum256(data)
	}
	return data, err
}

func (l *Linear) loadLocked(name string, i int) ([]byte, bool, error) {
	lay, err := l.layoutLocked()
	if err != nil {
		return nil, false, err
	}
	e := lay.entries[i]
	if !e.used() {
		return nil, false, fmt.Errorf("linear state file %s: no %s: %w", l.path, name, fs.ErrNotExist)
	}
	where := fmt.Sprintf("linear state file %s, %s (entry %d: %d bytes at offset %d)", l.path, name, i, e.dataLen, e.offset)
	if e.dataLen > maxFileSize {
		return nil, false, fmt.Errorf("%s: %w: more than %d bytes; the file was left untouched", where, ErrCorrupt, maxFileSize)
	}
	buf := make([]byte, e.dataLen)
	defer clear(buf)
	if n, err := preadFull(l.fd, buf, int64(e.offset)); err != nil || n != len(buf) {
		return nil, false, fmt.Errorf("%s: read %d of %d bytes: %v", where, n, len(buf), err)
	}
	r, err := decodeSwtpm(buf, blobTypes[name], decodeOpts{name: name, key: l.key, acceptPlain: l.accept})
	if err != nil {
		var h *hinted
		if errors.As(err, &h) {
			return nil, false, fmt.Errorf("%s: %w; the file was left untouched (%s)", where, h.err, h.hint)
		}
		return nil, false, fmt.Errorf("%s: %w; the file was left untouched", where, err)
	}
	switch {
	case r.format.plain() && l.key != nil:
		l.log.Warn("imported an unencrypted swtpm state blob; it will be written encrypted from now on", "file", l.path, "blob", name)
	case r.format == formatBare || r.format == formatBareKey:
		l.log.Info("read a state blob that swtpm wrote before its blob header; it will be written in the current format", "file", l.path, "blob", name)
	}
	current := r.format == formatSwtpmPlain
	if l.key != nil {
		current = r.format == formatSwtpm
	}
	return r.payload, current, nil
}

// Store writes data as blob name (see Linear for the order of the writes). When the
// entry is known to hold data already it writes nothing.
func (l *Linear) Store(name string, data []byte) error {
	i, err := l.index(name)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.writableLocked(name); err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	if k, ok := l.known[name]; ok && k == sum {
		return nil
	}
	delete(l.known, name)
	blob, err := envelope.EncodeFile(data, l.key)
	if err != nil {
		return fmt.Errorf("linear state file %s: encode %s: %w", l.path, name, err)
	}
	defer clear(blob)
	lay, err := l.layoutLocked()
	if err != nil {
		return err
	}
	at, err := lay.place(uint64(len(blob)), l.capacity)
	if err != nil {
		return fmt.Errorf("linear state file %s: store %s: %w%s", l.path, name, err, l.growHint())
	}
	if err := pwriteAll(l.fd, blob, int64(at)); err != nil {
		return fmt.Errorf("linear state file %s: write %s: %w", l.path, name, err)
	}
	if err := l.sync(); err != nil {
		return fmt.Errorf("linear state file %s: sync %s: %w", l.path, name, err)
	}
	lay.set(i, at, uint64(len(blob)))
	if err := l.commitLocked(&lay); err != nil {
		return err
	}
	l.known[name] = sum
	return nil
}

func (l *Linear) growHint() string {
	if l.blockdev {
		return "; the block device must hold each state blob twice (the new copy is written before the old one is given up): use a larger device"
	}
	return ""
}

// commitLocked writes the header lay and gives a regular file's space behind the last
// entry back.
func (l *Linear) commitLocked(lay *layout) error {
	if err := l.writeHeader(lay); err != nil {
		return err
	}
	if l.blockdev {
		return nil
	}
	size, err := l.size()
	if err == nil && size > lay.end() {
		err = unix.Ftruncate(l.fd, int64(lay.end()))
	}
	if err != nil {
		// The state is committed; only space is not given back.
		l.log.Warn("linear state file: could not truncate the space behind the last entry", "file", l.path, "err", err)
	}
	return nil
}

func (l *Linear) writableLocked(name string) error {
	switch {
	case l.closed:
		return fmt.Errorf("linear state file %s: closed", l.path)
	case !l.locked:
		return fmt.Errorf("linear state file %s: %w", l.path, ErrLockReleased)
	}
	if err := l.bad[name]; err != nil {
		return fmt.Errorf("linear state file %s: %s could not be read (%w); it is not overwritten: restore the file, or remove the entry with a new file", l.path, name, err)
	}
	return nil
}

// Delete clears blob name's entry; an unused entry is not an error.
func (l *Linear) Delete(name string) error {
	i, err := l.index(name)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.writableLocked(name); err != nil {
		return err
	}
	delete(l.known, name)
	lay, err := l.layoutLocked()
	if err != nil {
		return err
	}
	if !lay.entries[i].used() {
		return nil
	}
	lay.set(i, 0, 0)
	return l.commitLocked(&lay)
}

// States lists the blobs present (their sizes as stored), in the order of Names.
func (l *Linear) States() ([]StateInfo, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	lay, err := l.layoutLocked()
	if err != nil {
		return nil, err
	}
	return lay.states(), nil
}

func (lay *layout) states() []StateInfo {
	var out []StateInfo
	for _, n := range Names {
		i, _ := linearIndex(n)
		if e := lay.entries[i]; e.used() {
			out = append(out, StateInfo{Name: n, Size: int64(e.dataLen)})
		}
	}
	return out
}

// LinearStates lists the blobs in the linear state file at path without locking or
// changing it (for --print-states). A missing, empty or zeroed file has none.
func LinearStates(path string) ([]StateInfo, error) {
	fd, err := openNoIntr(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("linear state file %s: %w", path, &fs.PathError{Op: "open", Path: path, Err: err})
	}
	l := &Linear{path: path, fd: fd, log: slog.New(slog.DiscardHandler)}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		l.blockdev = true
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&l.capacity))); e != 0 {
			return nil, fmt.Errorf("linear state file %s: the block device's size: %w", path, e)
		}
	}
	lay, err := l.layoutLocked()
	if err != nil {
		return nil, err
	}
	return lay.states(), nil
}

// ReleaseLock gives up the lock while the Linear stays open (see Dir.ReleaseLock).
func (l *Linear) ReleaseLock() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.locked || l.closed {
		return nil
	}
	lk := unix.Flock_t{Type: unix.F_UNLCK}
	if err := unix.FcntlFlock(uintptr(l.fd), unix.F_OFD_SETLK, &lk); err != nil {
		return fmt.Errorf("linear state file %s: release lock: %w", l.path, err)
	}
	l.locked = false
	clear(l.known)
	return nil
}

// LockStorage takes the lock after ReleaseLock or DeferLock: retries+1 tries, 10 ms
// apart, stopping early when ctx ends (see Dir.LockStorage).
func (l *Linear) LockStorage(ctx context.Context, retries int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("linear state file %s: closed", l.path)
	}
	if l.locked {
		return nil
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for i := 0; ; i++ {
		err := l.lockFD()
		if err == nil {
			l.locked = true
			_, err = l.layoutLocked() // formats a new file
			return err
		}
		if !errors.Is(err, ErrLocked) || i >= retries {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("linear state file %s: waiting for the lock: %w", l.path, ctx.Err())
		case <-t.C:
		}
	}
}

// Close releases the lock and wipes the key. Further calls do nothing.
func (l *Linear) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	clear(l.key)
	l.key = nil
	err := unix.Close(l.fd)
	l.fd = -1
	if err != nil {
		return fmt.Errorf("linear state file %s: close: %w", l.path, err)
	}
	return nil
}
