// Package state is nkp-swtpm's state directory: where libtpms' permanent, volatile and
// savestate blobs live between runs. It implements the NVRAM interface of
// swtpm/internal/libtpms (Load, Store, Delete by name).
//
// With a key, files are written in nkp's own authenticated format (AES-256-GCM with
// its header as additional data, two slots per file so that later writes go in place;
// the byte layout is in slots.go, version 1 in format.go),
// bound to their blob type and key. Without a key they are written in swtpm's
// plaintext format, so that real swtpm can read the directory back, and a warning is
// logged once. Reading accepts nkp's files, swtpm's plaintext files (only without a key,
// or with Options.AcceptPlaintext) and swtpm's --key encrypted files (same key), so a VM
// moving from swtpm keeps its TPM. File names are swtpm's (tpm2-00.permall, ...), and the
// directory is locked through swtpm's .lock file for the Dir's life.
//
// Writes are crash-safe and durable: a Store that returned survives a process crash
// and a power loss. A new file is written as temp file, fdatasync, rename, fsync of the
// directory (a crash in between leaves the old file or the new one); later writes of a
// keyed file overwrite the slot that does not hold the newest record (body, fdatasync, then header, fdatasync)
// (a crash in between damages only that slot, which then fails authentication, and the
// reader takes the other). A Store of the payload a file is
// known to hold already writes nothing. A file that could not be read is never
// overwritten nor deleted by this Dir.
//
// Damaged slots: when one slot of an encrypted file fails authentication, Load decides
// from the slot's header (itself authenticated in format version 3) whether the damaged
// slot may have held a newer record than the one that opens:
//   - it names an older record, or is empty: a write cut by a crash (records are written
//     body first, header last) or damage to an older record. Nothing acknowledged is
//     lost; the newest record loads, with a warning.
//   - it names a newer record, or its header is damaged: the record was complete when its
//     write was acknowledged, so loading the older one would silently undo that write.
//     Load refuses (ErrRollback, the file untouched) unless Options.AcceptRollback.
//   - it was written in one pass (format version 2, before this rule, or Options.NoSync):
//     a crash and damage look the same there, so the older record loads, logged at
//     error level as a rollback.
//
// Every damaged slot is logged with the file, both slots and their sequence numbers, at
// every load, and counted in Stats (DamagedSlots, Rollbacks); the file is kept as
// evidence (<file>.damaged.<time>, a hard link) and the next Store writes a new file
// instead of overwriting the damaged slot. The counts since Open are in each of those
// log lines as nkp_swtpm_state_rollbacks_total and nkp_swtpm_state_damaged_slots_total
// (LogMetricRollbacks, LogMetricDamagedSlots): nkp-swtpm serves no metrics endpoint (one
// process per VM, no listener but the TPM's own sockets, under seccomp), and a rollback
// can only happen while the state loads at start or INIT, so the log line of that load
// is where a log-based exporter (mtail, promtail) turns it into a Prometheus counter.
//
// Each encrypted record carries the directory's state ID (.nkp-state-id, made at the
// first encrypted write), so that a state file copied from another VM's directory is
// refused (ErrForeign) even under the same key. A world-writable directory is refused
// at Open.
//
// Formats read: nkp's (versions 1 to 3), and everything swtpm 0.7.1 reads — its
// blob-header files (plaintext, or --key encrypted) and the header-less files of swtpm
// before that header (bare libtpms blobs, and AES-CBC files with a SHA-256 inside).
//
// Options.Mode (when non-zero) is also given to the state files already in the
// directory, and their .bak copies, each time the Dir takes the lock (Open, or
// LockStorage after DeferLock or ReleaseLock): swtpm's rename on every write gives its
// files that mode, but in-place slot writes keep a file's mode, and under libvirt
// swtpm_setup creates the files 0640 before libvirt starts the TPM with mode=0600. A
// file this user cannot chmod is logged and left; links are not followed.
//
// A state file is read with O_NOFOLLOW, so a symbolic link in its place is refused, and
// so is a file with more hard links than the names this package gives it (the file, its
// .bak, the backup's temporary name, .damaged.* evidence): another name could reach the
// TPM's state from outside the directory. Both refusals leave the file untouched.
//
// Keys: hex (32 or 64 digits, optional 0x) or binary (16 or 32 bytes); the key's length
// decides and a mode= must agree with it (swtpm would take a 16-byte binary key under
// aes-256-cbc as 128-bit; nkp refuses the contradiction); aes-256-gcm is accepted as a
// 256-bit key (swtpm does not accept it). A 128-bit key works for nkp's format too (the
// AEAD key is derived). The fixtures of swtpm's old formats are in
// testdata/swtpm-legacy, built from swtpm's source (its README says how). What a Store
// costs is in BENCHMARKS.md.
//
// The linear file (swtpm's backend-uri=file://, a regular file or a block device) is
// Linear, opened with OpenLinear: swtpm's layout (linear.go) with each blob in swtpm's
// format, so that swtpm 0.7.1 and nkp-swtpm share such files both ways, with or
// without --key (there, unlike in the directory, nkp writes swtpm's AES-CBC + HMAC
// format: nkp's slots and state ID have no place in swtpm's layout). A Store writes the
// new blob where no live data lies, syncs, then writes the header that points at it and
// syncs, so a crash leaves the old or the new blob, never a torn one; the file is
// locked (an open-file-description lock, which conflicts with swtpm ≥ 0.8's lock
// option; swtpm 0.7.1 never locks a linear file, so it cannot be kept out),
// never followed through a link, refused when other users may read or write it, and
// formatted only when empty or zeroed.
//
// Importers: swtpm/cli, which opens the directory for the swtpm server and parses
// --key/--migration-key with ParseKeySpec/ParseKey; hostd/vm, which re-encrypts a
// stopped VM's state under a new key on rekey (it links no libtpms); and tests.
package state

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/swtpm/envelope"
)

// Names are the blob names libtpms uses, in the order States reports them.
var Names = []string{"permall", "volatilestate", "savestate"}

// DefaultMode is swtpm's default mode for state files.
const DefaultMode os.FileMode = 0o640

// Options configure Open.
type Options struct {
	// Key encrypts the state (nkp's AES-256-GCM format) and decrypts swtpm --key files.
	// nil: plaintext state in swtpm's format, with a warning in the log. Open copies
	// the key; the caller may Wipe its Key once Open returned.
	Key *Key
	// Mode of the state files; 0 means DefaultMode (0640, like swtpm; libvirt passes
	// 0600). A non-zero Mode is also given to the state files already there once the
	// lock is taken (see applyModeLocked). An existing directory's own mode is left alone.
	Mode os.FileMode
	// Lock is accepted for the CLI's lock sub-option but has no effect: the directory
	// backend always locks, as swtpm's does.
	Lock bool
	// AcceptPlaintext lets a keyed Dir read swtpm's unencrypted files: a one-time import
	// of a VM's state from an unencrypted swtpm. The next Store writes them encrypted.
	// Off by default, so that nobody can swap an encrypted state for a plaintext one.
	AcceptPlaintext bool
	// Backup keeps the previous version of each file as <file>.bak (swtpm's backup
	// option); Load falls back to it when the file itself cannot be read.
	Backup bool
	// DeferLock opens the directory without locking it, for an incoming migration on
	// shared storage (swtpm's --migration incoming): the source holds the lock until it
	// hands the state over. Load works; Store and Delete fail with ErrLockReleased until
	// LockStorage takes the lock.
	DeferLock bool
	// NoSync skips the fdatasyncs of the in-place slot writes (records then carry
	// flagNoSync, so a damaged newer slot is loaded past as a possible rollback rather
	// than refused). A killed process never leaves a torn state, but a power loss may
	// lose the last writes. New files (the first write, a record that outgrew its slots,
	// plaintext state) are always written through internal/atomicfile, synced.
	// swtpm ≥ 0.8 never fsyncs by default (it found the stalls caused TPM command
	// timeouts); nkp syncs unless told otherwise.
	NoSync bool
	// AcceptRollback loads the older record of a slotted file whose newer slot fails
	// authentication although it was written completely (ErrRollback otherwise): the
	// operator's choice to lose the newest write rather than restore a backup. Each such
	// load is logged at error level and counted in Stats.
	AcceptRollback bool
	// Log gets warnings (plaintext state, backup fallbacks, damaged slots). nil discards them.
	Log *slog.Logger
}

// Stats counts what the Dir passed over while loading, since Open.
type Stats struct {
	// DamagedSlots counts slots of slotted files that failed authentication and were
	// passed over for the other slot (each is also logged, with file, slot and
	// sequence numbers).
	DamagedSlots uint64
	// Rollbacks counts loads that took an older record while a slot that may have held
	// a newer one failed authentication: the TPM's state may have gone back by one write.
	Rollbacks uint64
}

// StateInfo describes one state file, for --print-states.
type StateInfo struct {
	Name string // "permall", "volatilestate" or "savestate"
	Size int64  // bytes on disk
}

// Dir is an open, locked state directory. Its methods are safe for concurrent use.
type Dir struct {
	dir  string
	mode os.FileMode
	// explicitMode: Options.Mode was given, so existing files get it too.
	explicitMode bool
	log          *slog.Logger
	backup       bool
	noSync       bool
	accept       bool
	rollback     bool // Options.AcceptRollback

	mu    sync.Mutex // guards everything below
	key   []byte     // nil without a key; wiped by Close
	seal  *sealer
	lock  *os.File // nil after ReleaseLock
	dirFD *os.File // for fsync of the directory
	bad   map[string]error
	// known holds, per blob name, the SHA-256 of the payload that its file is known to
	// hold in the format Store writes (read back by Load, or written by Store), so that
	// a Store of the same payload writes nothing: libtpms stores the permanent state
	// unchanged at every start and TPM2_Startup, and each write costs two fsyncs.
	known map[string][sha256.Size]byte
	// slots holds, per blob name, where the newest record of its slotted file is (as
	// loaded or last stored), so that the next Store overwrites the other slot in place.
	slots map[string]slotInfo
	// stateID is the directory's state ID (.nkp-state-id), nil until it has one: read
	// at Open and when the lock is taken, made by the first keyed Store.
	stateID []byte
	stats   Stats
	closed  bool
}

// FileName returns swtpm's file name for a blob name (TPM 2: tpm2-00.<name>).
func FileName(name string) string { return "tpm2-00." + name }

func tempName(name string) string { return "TMP2-00." + name }

// Open opens and locks the state directory dir, which must exist and be writable. It
// fails with an error wrapping ErrLocked when another process holds the directory
// (unless Options.DeferLock).
func Open(dir string, opts Options) (*Dir, error) {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("state directory %s does not exist: create it (owned by the user nkp-swtpm runs as) or check the path: %w", dir, err)
	case err != nil:
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	case !fi.IsDir():
		return nil, fmt.Errorf("state directory %s is not a directory; give --tpmstate dir= a directory", dir)
	case fi.Mode().Perm()&0o002 != 0:
		return nil, fmt.Errorf("state directory %s is writable by every user (mode %#o): anyone on the host could replace or delete the TPM's state; restrict it with chmod o-w %s (0700, or 0750 with a group, is what a key store wants)", dir, fi.Mode().Perm(), dir)
	}
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return nil, fmt.Errorf("state directory %s is not writable (%w): the TPM could not save its state; check that the file system is mounted read-write, the directory is not immutable (lsattr), and its owner and mode", dir, err)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Dir{
		dir:      dir,
		mode:     opts.Mode.Perm(),
		log:      log,
		backup:   opts.Backup,
		noSync:   opts.NoSync,
		accept:   opts.AcceptPlaintext,
		rollback: opts.AcceptRollback,
		bad:      map[string]error{},
		known:    map[string][sha256.Size]byte{},
		slots:    map[string]slotInfo{},
	}
	d.explicitMode = d.mode != 0
	if d.mode == 0 {
		d.mode = DefaultMode
	}
	if k := opts.Key.Bytes(); k != nil {
		if len(k) != 16 && len(k) != 32 {
			return nil, fmt.Errorf("state directory %s: key is %d bytes; want 16 or 32", dir, len(k))
		}
		if d.seal, err = newSealer(k); err != nil {
			return nil, fmt.Errorf("state directory %s: %w", dir, err)
		}
		d.key = append([]byte{}, k...)
	}
	if !opts.DeferLock {
		if d.lock, err = lockDir(dir, d.mode); err != nil {
			d.wipe()
			return nil, err
		}
		d.applyModeLocked()
	}
	if d.lock != nil {
		d.cleanTempsLocked()
	}
	if d.stateID, err = readStateID(dir); err != nil {
		if d.lock != nil {
			d.lock.Close()
		}
		d.wipe()
		return nil, err
	}
	if d.dirFD, err = os.Open(dir); err != nil {
		if d.lock != nil {
			d.lock.Close()
		}
		d.wipe()
		return nil, fmt.Errorf("state directory %s: open for fsync: %w", dir, err)
	}
	if d.key == nil {
		log.Warn("TPM state is not encrypted: no --key given; anyone who can read the state directory can read the TPM's secrets", "dir", dir)
	}
	return d, nil
}

func (d *Dir) wipe() {
	clear(d.key)
	d.key = nil
	d.seal = nil
}

func (d *Dir) path(name string) (string, error) {
	if _, ok := blobTypes[name]; !ok {
		return "", fmt.Errorf("state directory %s: unknown state blob %q (want permall, volatilestate or savestate)", d.dir, name)
	}
	return filepath.Join(d.dir, FileName(name)), nil
}

// Load returns the payload of blob name. When there is none the error wraps
// fs.ErrNotExist (the TPM then manufactures itself). Any other failure leaves the file
// untouched and makes Store and Delete of that name refuse for this Dir's life.
func (d *Dir) Load(name string) ([]byte, error) {
	p, err := d.path(name)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("state file %s: directory closed", p)
	}
	d.forgetLocked(name)
	data, current, slots, err := d.loadFile(name, p)
	if err == nil && current {
		d.known[name] = sha256.Sum256(data)
	}
	if err == nil && slots != nil && !d.backup {
		d.slots[name] = *slots
	}
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		return data, err
	}
	if d.backup {
		if bak, _, _, berr := d.loadFile(name, p+".bak"); berr == nil {
			d.log.Warn("state file unreadable; using its backup", "file", p, "error", err.Error())
			d.bad[name] = errRecovered
			return bak, nil
		}
	}
	d.bad[name] = err
	return nil, err
}

// errRecovered marks a name loaded from its backup: the next Store moves the unreadable
// file aside instead of making it the backup.
var errRecovered = errors.New("recovered from backup")

// maxFileSize bounds a state file: libtpms' blobs are tens of KB (permanent state with a
// full NV space ~100 KB), so anything far larger is not a TPM state and is not read
// into memory.
const maxFileSize = 8 << 20

// loadFile reads and decodes the state file p. current reports that the file is in the
// format Store writes (nkp's with a key, swtpm's plaintext without), so that storing
// the same payload again would change nothing.
func (d *Dir) loadFile(name, p string) (data []byte, current bool, slots *slotInfo, err error) {
	file, err := readFile(p)
	if err != nil {
		return nil, false, nil, err
	}
	defer clear(file)
	r, err := decode(file, decodeOpts{name: name, seal: d.seal, key: d.key, acceptPlain: d.accept, dirID: d.stateID, acceptRollback: d.rollback})
	if err != nil {
		var h *hinted
		if errors.As(err, &h) {
			return nil, false, nil, fmt.Errorf("state file %s: %w; the file was left untouched (%s)", p, h.err, h.hint)
		}
		return nil, false, nil, fmt.Errorf("state file %s: %w; the file was left untouched", p, err)
	}
	switch {
	case r.format.plain() && d.key != nil:
		d.log.Warn("imported an unencrypted swtpm state file; it will be written encrypted from now on", "file", p)
	case r.format == formatBare || r.format == formatBareKey:
		d.log.Info("read a state file that swtpm wrote before its blob header; it will be written in the current format", "file", p)
	}
	if d.seal != nil {
		current = r.format == formatNKPSlots
	} else {
		current = r.format == formatSwtpmPlain
	}
	if len(r.damaged) > 0 {
		d.reportDamageLocked(p, r)
		// The next Store writes a new file (the damaged one stays as evidence).
		return r.payload, false, nil, nil
	}
	return r.payload, current, r.slots, nil
}

// reportDamageLocked logs every slot that a load passed over (each time: a damaged
// file is loaded at every start until a Store replaces it), counts it in Stats, and
// keeps the file as evidence under <file>.damaged.<unix time> (a hard link; Load then
// forgets the slots, so the next Store writes a new file instead of overwriting the
// damaged slot in place).
func (d *Dir) reportDamageLocked(p string, r decoded) {
	evidence := d.keepEvidence(p)
	for _, dm := range r.damaged {
		d.stats.DamagedSlots++
		attrs := []any{"file", p, "slot", dm.slot, "slot_sequence", dm.claimed(), "reason", dm.reason,
			"loaded_slot", r.slots.cur, "loaded_sequence", r.slots.seq, "evidence", evidence}
		if dm.newer {
			d.stats.Rollbacks++
			msg := "state file: a slot that may hold a newer record fails authentication; the TPM continues from the older record, so its last write may be undone (a write cut by a crash in a file written by an earlier nkp-swtpm, or damage)"
			if !dm.onePass && dm.known {
				msg = "state file: a slot holding a newer, completely written record fails authentication; continuing from the older record as --tpmstate accept-rollback allows: the TPM's last acknowledged write is undone"
			}
			d.log.Error(msg, append(attrs, d.totals()...)...)
			continue
		}
		d.log.Warn("state file: a slot fails authentication and is passed over; the other slot holds the newest record, so nothing acknowledged is lost (a write cut by a crash, or damage to an older record)", append(attrs, d.totals()...)...)
	}
}

// totals are the Stats counters as log attributes, named as Prometheus counters
// (LogMetricRollbacks, LogMetricDamagedSlots) so that a log-based exporter can serve them.
func (d *Dir) totals() []any {
	return []any{LogMetricRollbacks, d.stats.Rollbacks, LogMetricDamagedSlots, d.stats.DamagedSlots}
}

// The attribute names of the Stats counters in the damaged-slot log lines.
const (
	LogMetricRollbacks    = "nkp_swtpm_state_rollbacks_total"
	LogMetricDamagedSlots = "nkp_swtpm_state_damaged_slots_total"
)

// keepEvidence hard-links p as <p>.damaged.<unix time> unless such a link to the same
// file exists already, and returns its name ("" if it could not be made; logged).
func (d *Dir) keepEvidence(p string) string {
	fi, err := os.Lstat(p)
	if err != nil {
		return ""
	}
	old, _ := filepath.Glob(p + ".damaged.*")
	for _, o := range old {
		if ofi, err := os.Lstat(o); err == nil && os.SameFile(fi, ofi) {
			return o
		}
	}
	ev := fmt.Sprintf("%s.damaged.%d", p, time.Now().UnixNano())
	if d.lock == nil {
		return "" // not ours to write now (lock released or deferred)
	}
	if err := os.Link(p, ev); err != nil {
		d.log.Warn("state file: could not keep the damaged file as evidence", "file", p, "err", err)
		return ""
	}
	return ev
}

// cleanTempsLocked removes the temporary files that a killed process left while it
// wrote a new state file (internal/atomicfile's ".NAME.tmp-*"); only under the lock.
func (d *Dir) cleanTempsLocked() {
	paths := []string{filepath.Join(d.dir, stateIDFile)}
	for _, n := range Names {
		paths = append(paths, filepath.Join(d.dir, FileName(n)))
	}
	// One listing of the directory for all of them.
	removed, err := atomicfile.CleanTemps(paths...)
	if err != nil {
		d.log.Warn("state directory: could not remove what an interrupted write left", "dir", d.dir, "err", err)
	}
	if len(removed) > 0 {
		d.log.Info("state directory: removed what an interrupted write left", "files", removed)
	}
}

// forgetLocked drops what the Dir knows about blob name's file.
func (d *Dir) forgetLocked(name string) {
	delete(d.known, name)
	delete(d.slots, name)
}

// readFile reads a state file of at most maxFileSize bytes with plain system calls (no
// netpoller registration, which os.Open attempts for every file and costs four more
// system calls).
func readFile(p string) ([]byte, error) {
	fd, err := openNoIntr(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", p, &fs.PathError{Op: "open", Path: p, Err: err})
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("state file %s: %w", p, &fs.PathError{Op: "fstat", Path: p, Err: err})
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size > maxFileSize {
		return nil, fmt.Errorf("state file %s: %w: not a regular file of at most %d bytes; the file was left untouched", p, ErrCorrupt, maxFileSize)
	}
	if err := checkLinks(p, &st); err != nil {
		return nil, err
	}
	// One read more than the size, so that a file that grew meanwhile is read whole
	// (up to the bound) and a short file ends the loop.
	buf := make([]byte, 0, st.Size+1)
	for {
		if len(buf) == cap(buf) {
			if len(buf) > maxFileSize {
				clear(buf)
				return nil, fmt.Errorf("state file %s: %w: more than %d bytes; the file was left untouched", p, ErrCorrupt, maxFileSize)
			}
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := unix.Read(fd, buf[len(buf):cap(buf)])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			clear(buf)
			return nil, fmt.Errorf("state file %s: %w", p, &fs.PathError{Op: "read", Path: p, Err: err})
		}
		if n == 0 {
			return buf, nil
		}
		buf = buf[:len(buf)+n]
	}
}

// openNoIntr is open(2), retried on EINTR.
func openNoIntr(p string, flags int, mode uint32) (int, error) {
	for {
		fd, err := unix.Open(p, flags, mode)
		if !errors.Is(err, unix.EINTR) {
			return fd, err
		}
	}
}

// Store writes data as blob name: temp file, fdatasync, rename, fsync of the directory
// (without the syncs under Options.NoSync). When the file is known to hold data already
// (this Dir loaded it from a file in the format Store writes, or stored it last) it
// writes nothing.
func (d *Dir) Store(name string, data []byte) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("state file %s: directory closed", p)
	}
	if err := d.refuseLocked(name, p); err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	if k, ok := d.known[name]; ok && k == sum {
		return nil // the file holds this payload already
	}
	slots, inPlace := d.slots[name]
	d.forgetLocked(name) // until the new record is durable
	if d.seal != nil && d.stateID == nil {
		if d.stateID, err = makeStateID(d.dir, d.mode); err != nil {
			return err
		}
	}
	if inPlace && d.seal != nil {
		if next, err := d.storeInPlace(name, p, data, slots); err == nil {
			d.known[name] = sum
			d.slots[name] = next
			return nil
		} else if !errors.Is(err, errNoFit) {
			return fmt.Errorf("state file %s: %w", p, err)
		}
	}
	var file []byte
	var next slotInfo
	if d.seal != nil {
		next = slotInfo{size: slotSizeFor(len(data)), seq: slots.seq + 1, cur: 0}
		var rec []byte
		rec, err = d.seal.sealSlot(blobTypes[name], next.seq, next.size, d.stateID, d.slotFlags(), data)
		if err == nil {
			file = newSlotFile(rec, next.size)
		}
	} else {
		file, err = envelope.EncodeFile(data, nil)
		defer clear(file)
	}
	if err != nil {
		return fmt.Errorf("state file %s: %w", p, err)
	}
	// A new file: internal/atomicfile's temp file, fsync, rename, fsync of the directory.
	f, err := atomicfile.Create(p, d.mode)
	if err != nil {
		return fmt.Errorf("state file %s: %w", p, err)
	}
	defer f.Abort()
	if _, err := f.Write(file); err != nil {
		return fmt.Errorf("state file %s: %w", p, err)
	}
	if d.backup {
		if err := d.keepBackupLocked(name, p); err != nil {
			return err
		}
	}
	if err := f.Commit(); err != nil {
		return fmt.Errorf("state file %s: %w", p, err)
	}
	d.known[name] = sum
	if d.seal != nil && !d.backup {
		d.slots[name] = next
	}
	return nil
}

// errNoFit: the record does not fit the file's slots; Store writes a new file.
var errNoFit = errors.New("record does not fit the slot")

// storeInPlace writes data into the slot of p's slotted file that does not hold the
// newest record (see slots.go): the record's body, fdatasync, then its header,
// fdatasync. The newest record is never touched, so a crash or power loss at any point
// leaves it readable, and a slot whose header is new holds a complete record.
func (d *Dir) storeInPlace(name, p string, data []byte, s slotInfo) (slotInfo, error) {
	if slotHeaderSize+len(data)+d.seal.aead.Overhead() > s.size {
		return slotInfo{}, errNoFit
	}
	next := slotInfo{size: s.size, seq: s.seq + 1, cur: 1 - s.cur}
	rec, err := d.seal.sealSlot(blobTypes[name], next.seq, next.size, d.stateID, d.slotFlags(), data)
	if err != nil {
		return slotInfo{}, err
	}
	fd, err := openNoIntr(p, unix.O_WRONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return slotInfo{}, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	defer unix.Close(fd)
	base := int64(next.cur * next.size)
	for _, part := range []struct {
		b   []byte
		off int64
	}{{rec[slotHeaderSize:], base + slotHeaderSize}, {rec[:slotHeaderSize], base}} {
		if err := pwriteAll(fd, part.b, part.off); err != nil {
			return slotInfo{}, &fs.PathError{Op: "write", Path: p, Err: err}
		}
		if err := d.syncFile(fd); err != nil {
			return slotInfo{}, &fs.PathError{Op: "fdatasync", Path: p, Err: err}
		}
	}
	return next, nil
}

// pwriteAll writes all of b at off, retrying on EINTR and short writes.
func pwriteAll(fd int, b []byte, off int64) error {
	for done := 0; done < len(b); {
		n, err := unix.Pwrite(fd, b[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		done += n
	}
	return nil
}

// slotFlags are the flags of the records this Dir writes.
func (d *Dir) slotFlags() uint16 {
	if d.noSync {
		return flagNoSync
	}
	return 0
}

// syncFile makes a new file's data durable: fdatasync, which also writes the metadata
// needed to read the data back (size, blocks) but not the times.
func (d *Dir) syncFile(fd int) error {
	if d.noSync {
		return nil
	}
	for {
		err := unix.Fdatasync(fd)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

func (d *Dir) syncDir() error {
	if d.noSync {
		return nil
	}
	return d.dirFD.Sync()
}

// refuseLocked refuses writes to a file that could not be read, and all writes while
// the lock is released.
func (d *Dir) refuseLocked(name, p string) error {
	if d.lock == nil {
		return fmt.Errorf("state file %s: %w", p, ErrLockReleased)
	}
	if err, ok := d.bad[name]; ok && err != errRecovered {
		return fmt.Errorf("state file %s could not be read earlier, so it is not overwritten: %w", p, err)
	}
	return nil
}

// keepBackupLocked makes the current file the backup (a hard link, so the file itself
// is never missing), or moves an unreadable file aside as <file>.corrupt.
func (d *Dir) keepBackupLocked(name, p string) error {
	if d.bad[name] == errRecovered {
		if err := os.Rename(p, p+".corrupt"); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("state file %s: move the unreadable file aside: %w", p, err)
		}
		delete(d.bad, name)
		return nil
	}
	tmpBak := filepath.Join(d.dir, tempName(name)+".bak")
	os.Remove(tmpBak)
	if err := os.Link(p, tmpBak); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // first write: nothing to back up
		}
		return fmt.Errorf("state file %s: backup: %w", p, err)
	}
	if err := os.Rename(tmpBak, p+".bak"); err != nil {
		os.Remove(tmpBak)
		return fmt.Errorf("state file %s: backup: %w", p, err)
	}
	return nil
}

// Delete removes blob name; a missing file is not an error.
func (d *Dir) Delete(name string) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("state file %s: directory closed", p)
	}
	if err := d.refuseLocked(name, p); err != nil {
		return err
	}
	d.forgetLocked(name)
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state file %s: %w", p, err)
	}
	if err := d.syncDir(); err != nil {
		return fmt.Errorf("state file %s: fsync directory: %w", p, err)
	}
	return nil
}

// States lists the state files present, in the order of Names.
func (d *Dir) States() ([]StateInfo, error) { return States(d.dir) }

// States lists the state files present in dir without opening or locking it (for
// --print-states, which swtpm_setup runs before it starts a TPM on the directory).
func States(dir string) ([]StateInfo, error) {
	var out []StateInfo
	for _, n := range Names {
		fi, err := os.Stat(filepath.Join(dir, FileName(n)))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("state directory %s: %w", dir, err)
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("state directory %s: %s is not a regular file", dir, FileName(n))
		}
		out = append(out, StateInfo{Name: n, Size: fi.Size()})
	}
	return out, nil
}

// Stats returns what the Dir's loads passed over since Open (damaged slots, rollbacks).
func (d *Dir) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stats
}

// Dir returns the directory's path.
func (d *Dir) Dir() string { return d.dir }

// Encrypted reports whether the Dir writes encrypted files (a key was given).
func (d *Dir) Encrypted() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.seal != nil
}

// Close releases the lock and wipes the key. Further calls do nothing.
func (d *Dir) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	d.wipe()
	var errs []error
	if d.lock != nil {
		errs = append(errs, d.lock.Close())
		d.lock = nil
	}
	errs = append(errs, d.dirFD.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("state directory %s: close: %w", d.dir, err)
	}
	return nil
}
