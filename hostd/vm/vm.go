package vm

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/internal/blockdev"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
	"github.com/nkp-dev/nkp/swtpm/state"
)

// KDK names one KDK version.
type KDK struct {
	ID      string
	Version int
}

// Keys is hostd's KDK cache as VM operations use it.
type Keys interface {
	// ProviderID is the provider this host joined.
	ProviderID() string
	// Primary is the current primary KDK version.
	Primary(ctx context.Context) (KDK, error)
	// Derive returns the key for (purpose, vmUUID, keyID) from KDK version k
	// (provider/kdk.Derive). The caller wipes it. It fails when this host does not hold
	// k (unknown version, or an ID that does not match the version).
	Derive(ctx context.Context, k KDK, purpose, vmUUID, keyID string) ([]byte, error)
}

// ErrNoDomain is wrapped by Libvirt's errors for a domain that does not exist.
var ErrNoDomain = errors.New("no such domain")

// Lifecycle is where a domain stands in libvirt.
type Lifecycle struct {
	// Active: the domain runs (or is paused, or is being started).
	Active bool
	// Persistent: the domain has a persistent definition (false: a transient domain,
	// started with virsh create, which vanishes when it stops).
	Persistent bool
	// ManagedSave: libvirt holds a managed save image of the domain (virsh
	// managedsave), which virsh start resumes with the definition it was saved with,
	// not the persistent one.
	ManagedSave bool
}

// Libvirt is what VM operations ask of libvirt. domain is a name or a UUID.
type Libvirt interface {
	// DomainXML returns the domain's persistent definition (virsh dumpxml --inactive
	// --security-info); an error wrapping ErrNoDomain when there is none.
	DomainXML(ctx context.Context, domain string) ([]byte, error)
	// DefineXML defines (replaces) a persistent domain.
	DefineXML(ctx context.Context, xml []byte) error
	// Lifecycle says where the domain stands in libvirt: running, defined, saved.
	Lifecycle(ctx context.Context, domain string) (Lifecycle, error)
	// Domains lists the UUIDs of the persistent domains.
	Domains(ctx context.Context) ([]string, error)
	// SecretValue returns a libvirt secret's value (the caller wipes it).
	SecretValue(ctx context.Context, secretUUID string) ([]byte, error)
	// TPMCheck checks a running domain's TPM: present in QEMU and answering.
	TPMCheck(ctx context.Context, domain string) error
	// DiskEncryption says, for each disk target of a running domain, whether QEMU opened
	// it encrypted (QMP query-block's "encrypted" through libvirt; BlockEncrypted reads
	// the answer).
	DiskEncryption(ctx context.Context, domain string) (map[string]bool, error)
}

// Catalog is the provider's catalog of protected objects; *provider/client.Client is one.
type Catalog interface {
	RegisterObject(ctx context.Context, o apiv1.Object) error
	UnregisterObject(ctx context.Context, vmUUID, name string) error
	// MoveVM makes this host the owner of the VM's catalog objects (after the VM
	// migrated or was restored here: the provider lets a host change only its own).
	MoveVM(ctx context.Context, vmUUID string) ([]apiv1.Object, error)
	// ForgetVM removes every object of the VM that this host owns and returns them,
	// with the VM's objects other hosts own (left alone).
	ForgetVM(ctx context.Context, vmUUID string) (apiv1.ForgetResponse, error)
}

// Secrets keeps the libvirt secrets that hold protected disks' LUKS passphrases: one
// ephemeral, private secret per disk object, UUID domxml.SecretUUID(vmUUID, KeyID),
// value the lowercase hex of the key derived for (kdk.PurposeDisk, vmUUID, KeyID). hostd
// implements it; operations call it outside any hook request.
type Secrets interface {
	// Ensure defines (or defines again) the secrets of VM vmUUID's disk objects with
	// their derived values, and returns once libvirt holds them.
	Ensure(ctx context.Context, vmUUID string, disks []domxml.Object) error
	// Remove undefines those objects' secrets; a secret already gone is not an error.
	Remove(ctx context.Context, vmUUID string, disks []domxml.Object) error
}

// Owner is a uid and gid that files are given.
type Owner struct{ UID, GID int }

// Config configures a Manager.
type Config struct {
	Keys    Keys
	Libvirt Libvirt
	Catalog Catalog
	// Secrets defines disks' libvirt secrets; required to protect disks (nil: VM
	// operations refuse disks and handle the vTPM only).
	Secrets Secrets
	// VTPMDir holds the vTPM state directories (StateDir); hostd's <state>/vtpm.
	VTPMDir string
	// JournalDir holds the operations' journal; hostd's <state>/journal.
	JournalDir string
	// SocketDir is where hostd serves the vTPM sockets (/run/nkp/vtpm): the external
	// backend's path in the domain XML is SocketDir/<uuid>.sock.
	SocketDir string
	// SwtpmRoot is libvirt's swtpm state root (domxml.DefaultSwtpmRoot if empty).
	SwtpmRoot string
	// VTPMOwner owns the vTPM state directories and files (the user nkp-swtpm runs as);
	// nil leaves them to hostd's user.
	VTPMOwner *Owner
	// Setup, if set, manufactures each new vTPM with swtpm_setup as libvirt does (EK
	// and platform certificates, PCR banks); nil leaves a new vTPM's state empty, and
	// nkp-swtpm then starts with libtpms' defaults (all PCR banks, no certificates).
	Setup *SwtpmSetup
	// SwtpmOwner owns the state that unprotect hands back to libvirt (qemu.conf's
	// swtpm_user, "tss" on Debian); nil leaves it to hostd's user.
	SwtpmOwner *Owner
	Log        *slog.Logger
	// QemuImg runs qemu-img for disk conversions; nil runs qemu-img from PATH.
	QemuImg *qemuimg.Tool
	// Block finds dm-crypt under disk files (the zero value reads this system).
	Block blockdev.System
	// ProbeVTPM, if set, asks a running VM's vTPM whether it answers (hostd: the vTPM's
	// status channel, vtpm.Supervisor.Probe); Status calls it after libvirt reported
	// the TPM device present. nil: presence only.
	ProbeVTPM func(ctx context.Context, vmUUID string) error
	// ProcDir is the proc file system Finalize looks through for processes that still
	// have a kept original open ("/proc" if empty).
	ProcDir string
	// AfterStep, if set, is called after each journaled step of an operation with the
	// operation and the step's name (tests inject crashes there). Nil in production.
	AfterStep func(op, step string)
}

// Manager runs the VM operations. Its methods are safe for concurrent use; operations
// that change a VM run one at a time.
type Manager struct {
	cfg Config
	log *slog.Logger
	j   journal

	mu sync.Mutex // serialises Protect, Rekey, Unprotect, Finalize, Forget and Recover

	busyMu sync.Mutex
	busy   string // the operation holding mu, as "protect of DOMAIN"; guarded by busyMu

	recMu sync.Mutex // serialises writes of the VMs' records (record.go)
}

// lock takes mu for the operation what ("protect of DOMAIN"). When another operation
// holds it (a large disk converts for hours), progress first hears a "wait" event naming
// that operation, so that nkpctl does not sit silent.
func (m *Manager) lock(what string, progress ProgressFunc) {
	if !m.mu.TryLock() {
		m.busyMu.Lock()
		other := m.busy
		m.busyMu.Unlock()
		if progress != nil {
			progress(vmapi.Progress{Phase: vmapi.PhaseWait, Note: other})
		}
		m.mu.Lock()
	}
	m.busyMu.Lock()
	m.busy = what
	m.busyMu.Unlock()
}

func (m *Manager) unlock() {
	m.busyMu.Lock()
	m.busy = ""
	m.busyMu.Unlock()
	m.mu.Unlock()
}

// New checks cfg and creates the directories it names (0700).
func New(cfg Config) (*Manager, error) {
	switch {
	case cfg.Keys == nil:
		return nil, errors.New("vm: Config.Keys is nil")
	case cfg.Libvirt == nil:
		return nil, errors.New("vm: Config.Libvirt is nil")
	case cfg.Catalog == nil:
		return nil, errors.New("vm: Config.Catalog is nil")
	case !filepath.IsAbs(cfg.VTPMDir):
		return nil, fmt.Errorf("vm: the vTPM state directory %q must be an absolute path", cfg.VTPMDir)
	case !filepath.IsAbs(cfg.JournalDir):
		return nil, fmt.Errorf("vm: the journal directory %q must be an absolute path", cfg.JournalDir)
	case !filepath.IsAbs(cfg.SocketDir):
		return nil, fmt.Errorf("vm: the vTPM socket directory %q must be an absolute path", cfg.SocketDir)
	}
	if cfg.SwtpmRoot == "" {
		cfg.SwtpmRoot = domxml.DefaultSwtpmRoot
	}
	if cfg.ProcDir == "" {
		cfg.ProcDir = "/proc"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	for _, d := range []string{cfg.VTPMDir, cfg.JournalDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
	}
	return &Manager{cfg: cfg, log: cfg.Log, j: journal{cfg.JournalDir}}, nil
}

// StateDir is the directory of a vTPM's state: root/<vm-uuid>/<key-id>. hostd's vTPM
// supervisor starts nkp-swtpm there with the key derived for keyID.
func StateDir(root, vmUUID, keyID string) string {
	return filepath.Join(root, vmUUID, keyID)
}

// Errors of the operations, translated to vmapi codes at the HTTP edge. Each is wrapped
// in a sentence naming the VM and what to do.
var (
	ErrRunning          = errors.New("the domain is running")
	ErrAlreadyProtected = errors.New("the domain is already protected")
	ErrNotProtected     = errors.New("the domain is not protected by nkp")
	ErrUnsupported      = errors.New("unsupported configuration")
	ErrSaved            = errors.New("the domain has a saved state")
	ErrUnavailable      = errors.New("temporarily unavailable")
	ErrPending          = errors.New("an interrupted operation is not finished")
	ErrBadArgument      = errors.New("bad argument")
)

func (m *Manager) step(op, step string) {
	if m.cfg.AfterStep != nil {
		m.cfg.AfterStep(op, step)
	}
}

// lookup reads a domain's persistent XML and parses it.
func (m *Manager) lookup(ctx context.Context, domain string) ([]byte, *domxml.Domain, error) {
	x, err := m.cfg.Libvirt.DomainXML(ctx, domain)
	if err != nil {
		if errors.Is(err, ErrNoDomain) {
			// err repeats the name ("domain %q: no such domain"): the sentence says it once.
			return nil, nil, fmt.Errorf("vm %q: %w: check the name with virsh list --all", domain, ErrNoDomain)
		}
		return nil, nil, fmt.Errorf("vm %q: reading its definition from libvirt: %w: %w", domain, ErrUnavailable, err)
	}
	d, err := domxml.Parse(x)
	if err != nil {
		return nil, nil, fmt.Errorf("vm %q: %w; fix its definition with virsh edit %s", domain, err, domain)
	}
	if kdk.CheckUUID(d.UUID) != nil {
		return nil, nil, fmt.Errorf("vm %q: its definition has no valid <uuid> (%q)", domain, d.UUID)
	}
	return x, d, nil
}

// prepare looks a domain up for a change: it must exist and be shut off, and any
// interrupted operation on it is finished first.
func (m *Manager) prepare(ctx context.Context, domain, what string) ([]byte, *domxml.Domain, error) {
	_, d, err := m.lookup(ctx, domain)
	if err != nil {
		return nil, nil, err
	}
	if _, err := os.Stat(m.j.path(d.UUID)); err == nil {
		if err := m.recoverOneLocked(ctx, d.UUID); err != nil {
			return nil, nil, fmt.Errorf("vm %q: %w: %w; fix the cause and run the command again (hostd retries at its start too)", d.Name, ErrPending, err)
		}
	}
	x, d, err := m.lookup(ctx, domain)
	if err != nil {
		return nil, nil, err
	}
	lc, err := m.cfg.Libvirt.Lifecycle(ctx, d.UUID)
	if err != nil {
		return nil, nil, fmt.Errorf("vm %q: asking libvirt whether it is defined, runs or is saved: %w: %w", d.Name, ErrUnavailable, err)
	}
	if !lc.Persistent {
		// Shutting a transient domain down removes it: the sentence must not say so.
		return nil, nil, fmt.Errorf("vm %q: %w: it is a transient domain (started with virsh create, no persistent definition), and nkp changes only persistent definitions: make it persistent with virsh dumpxml %s > %s.xml and virsh define %s.xml, shut it down (virsh shutdown %s), then run the command again", d.Name, ErrUnsupported, d.Name, d.Name, d.Name, d.Name)
	}
	if lc.Active {
		return nil, nil, fmt.Errorf("vm %q: %w: %s needs it shut off (virsh shutdown %s), then run the command again", d.Name, ErrRunning, what, d.Name)
	}
	if lc.ManagedSave {
		// virsh start would resume the image with the definition it was saved with: the
		// old disk files and keys, while the new definition names others (and finalize
		// would remove the files the resumed VM writes to).
		return nil, nil, fmt.Errorf("vm %q: %w: it has a managed save image (virsh managedsave), which virsh start resumes with the definition it was saved with, not the one %s writes: start it and shut it down (virsh start %s, then virsh shutdown %s), or discard the saved memory with virsh managedsave-remove %s, then run the command again", d.Name, ErrSaved, what, d.Name, d.Name, d.Name)
	}
	return x, d, nil
}

// source is an open state directory and the blobs read from it.
type source struct {
	dir     *state.Dir
	blobs   map[string][]byte
	created string // the .lock file Open created, removed again if nothing was committed
}

func (s *source) close(committed bool) {
	for _, b := range s.blobs {
		clear(b)
	}
	if s.dir != nil {
		s.dir.Close()
	}
	if !committed && s.created != "" {
		os.Remove(s.created)
	}
}

// openSource opens dir (taking its lock) and reads every blob. key nil: swtpm's
// plaintext files. A missing dir gives an empty source.
func (m *Manager) openSource(dir string, key *state.Key) (*source, error) {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return &source{blobs: map[string][]byte{}}, nil
	}
	lock := filepath.Join(dir, ".lock")
	_, lerr := os.Lstat(lock)
	d, err := state.Open(dir, state.Options{Key: key, Log: m.log})
	if err != nil {
		return nil, err
	}
	s := &source{dir: d, blobs: map[string][]byte{}}
	if errors.Is(lerr, fs.ErrNotExist) {
		s.created = lock
	}
	for _, n := range state.Names {
		b, err := d.Load(n)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			s.close(false)
			return nil, fmt.Errorf("state directory %s: %s: %w", dir, n, err)
		}
		s.blobs[n] = b
	}
	return s, nil
}

// writeState writes blobs into dir (created 0700; it must not exist yet) under key
// (nil: swtpm's plaintext format), reads them back, and gives dir and the files to
// owner. Missing ancestors are created with parentMode.
//
// dir's parent (<root>/<vm-uuid>, nkp's or libvirt's) stays root's, 0711 when owner is
// set: were it the vTPM user's, a compromised vTPM could swap dir for a symlink between
// the Mkdir and the writes and have root write, chown or remove elsewhere (libvirt keeps
// /var/lib/libvirt/swtpm/<uuid> root's 0711 for the same reason; hostd/vtpm.Start too).
func (m *Manager) writeState(dir string, key *state.Key, blobs map[string][]byte, owner *Owner, parentMode fs.FileMode) error {
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, parentMode); err != nil {
		return err
	}
	if owner != nil {
		if err := rootParent(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	d, err := state.Open(dir, state.Options{Key: key, Mode: 0o600, Log: m.log})
	if err != nil {
		return err
	}
	for _, n := range state.Names {
		if b, ok := blobs[n]; ok {
			if err := d.Store(n, b); err != nil {
				d.Close()
				return fmt.Errorf("state directory %s: writing %s: %w", dir, n, err)
			}
		}
	}
	if err := d.Close(); err != nil {
		return err
	}
	// Read back through a fresh Dir: what the vTPM will load.
	d, err = state.Open(dir, state.Options{Key: key, Log: m.log})
	if err != nil {
		return err
	}
	defer d.Close()
	for _, n := range state.Names {
		b, err := d.Load(n)
		want, ok := blobs[n]
		switch {
		case !ok && errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return fmt.Errorf("state directory %s: reading back %s: %w", dir, n, err)
		case !bytes.Equal(b, want):
			clear(b)
			return fmt.Errorf("state directory %s: %s read back differs from what was written", dir, n)
		default:
			clear(b)
		}
	}
	if owner != nil {
		if err := chownTree(dir, *owner); err != nil {
			return err
		}
	}
	// The new directory's entry, and its parent's when MkdirAll made it.
	if err := atomicfile.SyncDir(filepath.Dir(dir)); err != nil {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(filepath.Dir(dir)))
}

// rootParent makes the existing directory parent (in a root-owned directory) hostd's own
// and 0711, so that the user a state directory is given to can reach it but not replace it.
func rootParent(parent string) error {
	fi, err := os.Lstat(parent)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", parent)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid() {
		if err := os.Lchown(parent, os.Geteuid(), os.Getegid()); err != nil {
			return err
		}
	}
	if fi.Mode().Perm() != 0o711 {
		return os.Chmod(parent, 0o711)
	}
	return nil
}

// chownTree gives dir (just written by hostd, 0700) and what is in it to owner, the
// contents first: while they change hands dir is still hostd's, so nobody can swap an
// entry for a link to a file root would then chown. dir itself goes last. Anything but
// a regular file or a directory is refused.
func chownTree(dir string, owner Owner) error {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !de.Type().IsRegular() && !de.IsDir() {
			return fmt.Errorf("%s: a %v in a state directory being written, refusing to chown", p, de.Type())
		}
		paths = append(paths, p)
		return nil
	})
	if err != nil {
		return err
	}
	for _, p := range slices.Backward(paths) {
		if err := os.Lchown(p, owner.UID, owner.GID); err != nil {
			return err
		}
	}
	return nil
}

// vtpmKey derives a vTPM state key.
func (m *Manager) vtpmKey(ctx context.Context, name, uuid string, o domxml.Object) (*state.Key, error) {
	b, err := m.cfg.Keys.Derive(ctx, KDK{ID: o.KDKID, Version: o.KDKVersion}, kdk.PurposeVTPM, uuid, o.KeyID)
	if err != nil {
		return nil, fmt.Errorf("vm %q: key %s: deriving from KDK version %d: %w: %w", name, o.KeyID, o.KDKVersion, ErrUnavailable, err)
	}
	defer clear(b)
	return state.NewKey(b)
}

// newObject makes a vTPM object on the primary KDK version.
func (m *Manager) newObject(ctx context.Context, name string) (domxml.Object, error) {
	p, err := m.cfg.Keys.Primary(ctx)
	if err != nil {
		return domxml.Object{}, fmt.Errorf("vm %q: no primary KDK version on this host: %w: %w (check that nkp-hostd joined and synced with the provider)", name, ErrUnavailable, err)
	}
	return domxml.Object{Name: domxml.ObjectVTPM, KeyID: kdk.NewKeyID(), KDKID: p.ID, KDKVersion: p.Version}, nil
}

func (m *Manager) register(ctx context.Context, uuid string, o domxml.Object) error {
	return m.owned(ctx, uuid, func() error {
		return m.cfg.Catalog.RegisterObject(ctx, apiv1.Object{VMUUID: uuid, Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion})
	})
}

func (m *Manager) unregister(ctx context.Context, uuid, name string) error {
	err := m.owned(ctx, uuid, func() error { return m.cfg.Catalog.UnregisterObject(ctx, uuid, name) })
	if client.IsCode(err, apiv1.CodeNotFound) {
		return nil
	}
	return err
}

// owned runs a catalog change; when the provider answers that another host owns the
// VM's objects (the VM was protected elsewhere and migrated or was restored here), it
// takes them over with MoveVM and runs the change once more.
func (m *Manager) owned(ctx context.Context, uuid string, change func() error) error {
	err := change()
	if !client.IsCode(err, apiv1.CodeNotOwner) {
		return err
	}
	objs, merr := m.cfg.Catalog.MoveVM(ctx, uuid)
	if merr != nil {
		return fmt.Errorf("%w (taking the VM's catalog objects over from the host that protected it failed too: %w)", err, merr)
	}
	m.log.Info("catalog objects of a VM protected on another host moved to this host", "uuid", uuid, "objects", len(objs))
	return change()
}

// Protect protects a shut-off domain with the defaults: ProtectWith with every disk and
// the originals kept.
func (m *Manager) Protect(ctx context.Context, domain string) (vmapi.VM, error) {
	return m.ProtectWith(ctx, domain, vmapi.ProtectRequest{}, nil)
}

// ProtectWith protects a shut-off domain: a new vTPM, or the domain's libvirt-managed
// swtpm state adopted (EK, NV and sealed secrets kept), re-encrypted under a key derived
// from the primary KDK version; its disks (req.Disks) converted into LUKS images under
// keys derived the same way, each verified with qemu-img compare; the catalog entries;
// nkp's metadata, the external TPM backend and the disks' new sources with <encryption>
// in the domain's definition. On a domain already protected it adds what is missing
// (the vTPM, disks not yet protected). progress, if set, receives each disk's progress.
func (m *Manager) ProtectWith(ctx context.Context, domain string, req vmapi.ProtectRequest, progress ProgressFunc) (vmapi.VM, error) {
	m.lock("protect of "+domain, progress)
	defer m.unlock()
	x, d, err := m.prepare(ctx, domain, "protect")
	if err != nil {
		return vmapi.VM{}, err
	}
	if d.Metadata != nil {
		if err := m.ownProvider(d); err != nil {
			return vmapi.VM{}, err
		}
	}
	var notes []string
	var chosen []*domxml.Disk
	skipped := map[string]string{}
	switch {
	case m.cfg.Secrets == nil && (req.Disks == "" || req.Disks == vmapi.DisksAll):
		for _, dk := range d.Disks {
			if _, ok := d.Metadata.Object(domxml.DiskObject(dk.Target)); !ok {
				skipped[dk.Target] = "skipped: this nkp-hostd keeps no disk secrets"
			}
		}
	case m.cfg.Secrets == nil && req.Disks != vmapi.DisksNone:
		return vmapi.VM{}, fmt.Errorf("vm %q: %w: this nkp-hostd keeps no libvirt secrets for disks, so it cannot encrypt %s; protect with --disks none", d.Name, ErrUnsupported, req.Disks)
	default:
		if chosen, skipped, err = selectDisks(d, req.Disks); err != nil {
			return vmapi.VM{}, err
		}
	}
	for _, t := range slices.Sorted(maps.Keys(skipped)) {
		notes = append(notes, "disk "+t+" "+skipped[t])
	}
	old, hasVTPM := d.Metadata.Object(domxml.ObjectVTPM)
	if hasVTPM && len(chosen) == 0 {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w (vTPM key %s, and no disk left to encrypt); see nkpctl vm status %s", d.Name, ErrAlreadyProtected, old.KeyID, d.Name)
	}
	type planned struct {
		dk    *domxml.Disk
		f     qemuimg.Format
		vsize int64
	}
	var plan []planned
	var others []*domxml.Domain // other domains, to note a disk file they share
	if len(chosen) > 0 {
		others, _ = m.otherDomains(ctx, d.UUID)
	}
	for _, dk := range chosen {
		f, vsize, err := m.checkDisk(ctx, d, dk, req.AllowDoubleEncryption)
		if err != nil {
			return vmapi.VM{}, err
		}
		plan = append(plan, planned{dk, f, vsize})
		if other := usedBy(others, dk.Source); other != "" {
			notes = append(notes, fmt.Sprintf("disk %s: domain %s names the same file %s and keeps using it unencrypted (the original is kept while it does)", dk.Target, other, dk.Source))
		}
	}

	var src *source
	var obj domxml.Object
	var key *state.Key
	var ext domxml.TPM
	note := ""
	if !hasVTPM {
		tp, err := d.TPM()
		if err != nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: %w: %w", d.Name, ErrUnsupported, err)
		}
		note = "new vTPM"
		model := ""
		if tp != nil {
			model = tp.Model
			switch tp.Backend {
			case domxml.BackendEmulator:
				if tp.Version == "1.2" {
					return vmapi.VM{}, fmt.Errorf("vm %q: %w: its TPM is version 1.2; nkp provides TPM 2.0 only (change <backend version> with virsh edit, losing that TPM's state, or leave the VM unprotected)", d.Name, ErrUnsupported)
				}
				dir := tp.EmulatorStateDir(m.cfg.SwtpmRoot, d.UUID)
				src, err = m.openEmulator(ctx, d, tp, dir)
				if err != nil {
					return vmapi.VM{}, err
				}
				if len(src.blobs) > 0 {
					note = "adopted libvirt's swtpm state from " + dir
				} else {
					note = "new vTPM (libvirt's swtpm had no state yet in " + dir + ")"
				}
			default:
				return vmapi.VM{}, fmt.Errorf("vm %q: %w: its TPM has a %q backend; nkp adopts only libvirt's emulator (swtpm): remove the <tpm> with virsh edit to get a new nkp vTPM", d.Name, ErrUnsupported, tp.Backend)
			}
		} else {
			src = &source{blobs: map[string][]byte{}}
		}
		ext = domxml.External(model, domxml.SocketPath(m.cfg.SocketDir, d.UUID))
	} else {
		src = &source{blobs: map[string][]byte{}}
	}
	committed := false
	defer func() { src.close(committed) }()

	p, err := m.cfg.Keys.Primary(ctx)
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: no primary KDK version on this host: %w: %w (check that nkp-hostd joined and synced with the provider)", d.Name, ErrUnavailable, err)
	}
	meta := d.Metadata.Clone()
	if meta == nil {
		meta = &domxml.Metadata{ProviderID: m.cfg.Keys.ProviderID()}
	}
	if !hasVTPM {
		obj = domxml.Object{Name: domxml.ObjectVTPM, KeyID: kdk.NewKeyID(), KDKID: p.ID, KDKVersion: p.Version}
		if tp, _ := d.TPM(); tp != nil && tp.EncryptionSecret != "" {
			obj.SwtpmSecret = tp.EncryptionSecret // unprotect --tpm keep encrypts under it again
		}
		if tp, _ := d.TPM(); tp != nil && tp.Backend == domxml.BackendEmulator && len(tp.ActivePCRBanks) > 0 {
			obj.PCRBanks = strings.Join(tp.ActivePCRBanks, ",") // the external backend has no place for them
		}
		if key, err = m.vtpmKey(ctx, d.Name, d.UUID, obj); err != nil {
			return vmapi.VM{}, err
		}
		defer key.Wipe()
		meta.SetObject(obj)
	}
	keys := keyring{}
	defer keys.wipe()
	var des []diskEntry
	for _, pl := range plan {
		o := domxml.Object{Name: domxml.DiskObject(pl.dk.Target), KeyID: kdk.NewKeyID(), KDKID: p.ID, KDKVersion: p.Version}
		k, err := m.diskKey(ctx, d.Name, d.UUID, o)
		if err != nil {
			return vmapi.VM{}, err
		}
		keys[o.KeyID] = k
		dst := qemuimg.LUKS
		if pl.f == qemuimg.QCOW2 {
			dst = qemuimg.QCOW2
		}
		de := diskEntry{Target: pl.dk.Target, Orig: pl.dk.Source, New: newDiskPath(pl.dk.Source, dst, o.KeyID, false),
			Obj: o, Mode: modeConvert, SrcFormat: pl.f, DstFormat: dst}
		if _, err := os.Lstat(de.New); err == nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: disk %s: %s exists already, and nkp does not overwrite a file it did not make: move it away and run the command again", d.Name, de.Target, de.New)
		}
		des = append(des, de)
		meta.SetObject(o)
	}
	if err := m.checkSpace(ctx, d.Name, ptrs(des), keys); err != nil {
		return vmapi.VM{}, err
	}
	nx, err := domxml.SetMetadata(x, meta)
	if err == nil && !hasVTPM {
		nx, err = domxml.SetTPM(nx, &ext)
	}
	for _, de := range des {
		if err != nil {
			break
		}
		nx, err = domxml.SetDisk(nx, de.Target, domxml.DiskEdit{Source: de.New, DriverType: driverType(de.DstFormat),
			Encryption: domxml.LUKS(domxml.SecretUUID(d.UUID, de.Obj.KeyID))})
	}
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w", d.Name, err)
	}
	// A new vTPM is manufactured before anything changes: a failure leaves all as it was.
	newBlobs := src.blobs
	if !hasVTPM && len(src.blobs) == 0 && m.cfg.Setup != nil {
		var banks []string
		if obj.PCRBanks != "" {
			banks = strings.Split(obj.PCRBanks, ",")
		}
		if newBlobs, err = m.manufacture(ctx, d, banks); err != nil {
			return vmapi.VM{}, err
		}
		defer func() {
			for _, b := range newBlobs {
				clear(b)
			}
		}()
		note = "new vTPM manufactured by swtpm_setup as libvirt does (EK and platform certificates, PCR banks " + cmp.Or(obj.PCRBanks, "of swtpm_setup.conf") + ")"
	}
	e := &entry{Op: opProtect, Domain: d.Name, UUID: d.UUID, New: obj, Disks: des, RemoveOriginal: req.RemoveOriginal}
	if !hasVTPM {
		e.NewDir = StateDir(m.cfg.VTPMDir, d.UUID, obj.KeyID)
		if tp, _ := d.TPM(); src.dir != nil && len(src.blobs) > 0 && tp != nil {
			e.Adopted = tp.EmulatorStateDir(m.cfg.SwtpmRoot, d.UUID)
		}
	}
	if err := m.j.write(e); err != nil {
		return vmapi.VM{}, err
	}
	m.step(opProtect, "journal")
	fail := func(err error) (vmapi.VM, error) {
		if rerr := m.recoverOneLocked(ctx, d.UUID); rerr != nil {
			m.log.Warn("vm: rolling back protect", "vm", d.Name, "err", rerr)
		}
		return vmapi.VM{}, err
	}
	if !hasVTPM {
		if err := m.writeState(e.NewDir, key, newBlobs, m.cfg.VTPMOwner, 0o711); err != nil {
			return fail(fmt.Errorf("vm %q: key %s: writing the vTPM state: %w", d.Name, obj.KeyID, err))
		}
		m.step(opProtect, "staged")
	}
	for i := range des {
		if err := m.convertDisk(ctx, d.Name, &des[i], keys, plan[i].vsize, progress, opProtect); err != nil {
			return fail(err)
		}
	}
	if err := m.ensureSecrets(ctx, d, diskObjects(des, true)); err != nil {
		return fail(err)
	}
	m.step(opProtect, "secrets")
	var regs []domxml.Object
	if !hasVTPM {
		regs = append(regs, obj)
	}
	for _, o := range append(regs, diskObjects(des, true)...) {
		if err := m.register(ctx, d.UUID, o); err != nil {
			return fail(fmt.Errorf("vm %q: %s key %s: registering in the provider's catalog: %w: %w; nothing was changed on this host, try again when the provider answers", d.Name, o.Name, o.KeyID, ErrUnavailable, err))
		}
	}
	m.step(opProtect, "registered")
	if err := m.cfg.Libvirt.DefineXML(ctx, nx); err != nil {
		return fail(fmt.Errorf("vm %q: defining the protected domain: %w", d.Name, err))
	}
	committed = true
	m.step(opProtect, "defined")
	src.close(true)
	src = &source{}
	finish := m.recoverOneLocked(ctx, d.UUID)
	if finish != nil {
		m.log.Warn("vm: protect: cleaning up (retried at hostd's start)", "vm", d.Name, "err", finish)
	}
	for _, de := range des {
		w := "kept until nkpctl vm protect --finalize " + d.Name
		if req.RemoveOriginal {
			w = "removed"
		}
		notes = append(notes, fmt.Sprintf("disk %s encrypted into %s (key %s), the original %s %s", de.Target, de.New, de.Obj.KeyID, de.Orig, w))
	}
	if note != "" {
		notes = append([]string{note}, notes...)
	}
	m.log.Info("vm protected", "vm", d.Name, "uuid", d.UUID, "key_id", obj.KeyID, "kdk_version", p.Version, "disks", len(des), "how", note)
	v, err := m.Status(ctx, d.UUID)
	v.Note = strings.Join(notes, "; ")
	v.Problems = appendFinish(v.Problems, finish)
	return v, err
}

// ensureSecrets has the disk objects' libvirt secrets defined before the domain names them.
func (m *Manager) ensureSecrets(ctx context.Context, d *domxml.Domain, objs []domxml.Object) error {
	if len(objs) == 0 {
		return nil
	}
	if m.cfg.Secrets == nil {
		return fmt.Errorf("vm %q: %w: this nkp-hostd keeps no libvirt secrets for disks", d.Name, ErrUnsupported)
	}
	if err := m.cfg.Secrets.Ensure(ctx, d.UUID, objs); err != nil {
		return fmt.Errorf("vm %q: defining the disks' libvirt secrets: %w: %w; nothing was changed, try again", d.Name, ErrUnavailable, err)
	}
	return nil
}

func driverType(f qemuimg.Format) string {
	if f == qemuimg.QCOW2 {
		return "qcow2"
	}
	return "raw"
}

func ptrs(des []diskEntry) []*diskEntry {
	out := make([]*diskEntry, len(des))
	for i := range des {
		out[i] = &des[i]
	}
	return out
}

// openEmulator opens libvirt's swtpm state of a domain, with the libvirt secret's
// passphrase when the state is encrypted (libvirt passes it to swtpm as pwdfd with
// mode aes-256-cbc).
func (m *Manager) openEmulator(ctx context.Context, d *domxml.Domain, tp *domxml.TPM, dir string) (*source, error) {
	var key *state.Key
	if tp.EncryptionSecret != "" {
		pw, err := m.cfg.Libvirt.SecretValue(ctx, tp.EncryptionSecret)
		if err != nil {
			return nil, fmt.Errorf("vm %q: reading libvirt secret %s, the passphrase of its swtpm state: %w; nothing was changed", d.Name, tp.EncryptionSecret, err)
		}
		key, err = passphraseKey(pw)
		clear(pw)
		if err != nil {
			return nil, fmt.Errorf("vm %q: libvirt secret %s: %w", d.Name, tp.EncryptionSecret, err)
		}
		defer key.Wipe()
	}
	src, err := m.openSource(dir, key)
	if err != nil {
		if errors.Is(err, state.ErrLocked) {
			return nil, fmt.Errorf("vm %q: %w: its swtpm state %s is in use by another process: %w", d.Name, ErrRunning, dir, err)
		}
		return nil, fmt.Errorf("vm %q: reading its libvirt-managed swtpm state: %w; nothing was changed", d.Name, err)
	}
	return src, nil
}

// passphraseKey turns a libvirt secret's value into swtpm's state key the way swtpm
// reads libvirt's "--key pwdfd=N,mode=aes-256-cbc": through a pipe, so the passphrase is
// in no file.
func passphraseKey(pw []byte) (*state.Key, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	if len(pw) > 60000 {
		r.Close()
		w.Close()
		return nil, errors.New("the passphrase is longer than 60000 bytes")
	}
	_, werr := w.Write(pw)
	w.Close()
	if werr != nil {
		r.Close()
		return nil, werr
	}
	fd, err := dupFD(r)
	r.Close()
	if err != nil {
		return nil, err
	}
	return state.ParseKey(state.KeySpec{Source: state.PwdFD, FD: fd, Mode: state.ModeAES256CBC}, nil)
}

// Rekey moves a shut-off domain's objects to the primary KDK version: RekeyWith without
// Deep.
func (m *Manager) Rekey(ctx context.Context, domain string) (vmapi.VM, error) {
	return m.RekeyWith(ctx, domain, vmapi.RekeyRequest{}, nil)
}

// RekeyWith moves a shut-off domain's objects that are not on the primary KDK version to
// it under new key IDs: the vTPM state re-encrypted into a new directory; each disk given
// a keyslot for its new key (the old slot removed after the switch), or with req.Deep
// every disk re-encrypted under a new master key into a new file (the old file kept until
// finalize). The catalog is updated after the switch.
func (m *Manager) RekeyWith(ctx context.Context, domain string, req vmapi.RekeyRequest, progress ProgressFunc) (vmapi.VM, error) {
	m.lock("rekey of "+domain, progress)
	defer m.unlock()
	x, d, err := m.prepare(ctx, domain, "rekey")
	if err != nil {
		return vmapi.VM{}, err
	}
	if d.Metadata == nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w (no nkp metadata); protect it first with nkpctl vm protect %s", d.Name, ErrNotProtected, d.Name)
	}
	old, hasVTPM := d.Metadata.Object(domxml.ObjectVTPM)
	if !hasVTPM && !slices.ContainsFunc(d.Metadata.Objects, isDiskObject) {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w (no nkp vTPM in its metadata); protect it first with nkpctl vm protect %s", d.Name, ErrNotProtected, d.Name)
	}
	if err := m.ownProvider(d); err != nil {
		return vmapi.VM{}, err
	}
	p, err := m.cfg.Keys.Primary(ctx)
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: no primary KDK version on this host: %w: %w", d.Name, ErrUnavailable, err)
	}
	moveVTPM := hasVTPM && p.ID != old.KDKID
	keys := keyring{}
	defer keys.wipe()
	var des []diskEntry
	var vsizes []int64
	for _, o := range d.Metadata.Objects {
		if !isDiskObject(o) || !req.Deep && o.KDKID == p.ID {
			continue
		}
		target := strings.TrimPrefix(o.Name, domxml.ObjectDiskPrefix)
		dk, ok := d.Disk(target)
		if !ok || dk.Type != "file" || dk.Source == "" {
			return vmapi.VM{}, fmt.Errorf("vm %q: %w: its metadata names disk %s (key %s), but the domain has no file disk %s: restore the disk with virsh edit, or unprotect the VM", d.Name, ErrUnsupported, target, o.KeyID, target)
		}
		f, err := imgFormat(dk.DriverType, true)
		if err != nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: %w: disk %s: %w", d.Name, ErrUnsupported, target, err)
		}
		n := domxml.Object{Name: o.Name, KeyID: kdk.NewKeyID(), KDKID: p.ID, KDKVersion: p.Version}
		for _, ob := range []domxml.Object{o, n} {
			k, err := m.diskKey(ctx, d.Name, d.UUID, ob)
			if err != nil {
				return vmapi.VM{}, err
			}
			keys[ob.KeyID] = k
		}
		de := diskEntry{Target: target, Orig: dk.Source, New: dk.Source, Old: o, Obj: n, Mode: modeShallow, SrcFormat: f, DstFormat: f}
		if req.Deep {
			de.Mode, de.New = modeConvert, newDiskPath(dk.Source, f, n.KeyID, false)
			if _, err := os.Lstat(de.New); err == nil {
				return vmapi.VM{}, fmt.Errorf("vm %q: disk %s: %s exists already, and nkp does not overwrite a file it did not make: move it away and run the command again", d.Name, target, de.New)
			}
		}
		info, err := m.qi().Info(ctx, qemuimg.Image{Path: dk.Source, Format: f, Key: keys[o.KeyID]})
		if err == nil {
			err = m.qi().Unlock(ctx, qemuimg.Image{Path: dk.Source, Format: f, Key: keys[o.KeyID]})
		}
		if err != nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: disk %s key %s: opening %s: %w; nothing was changed", d.Name, target, o.KeyID, dk.Source, err)
		}
		des = append(des, de)
		vsizes = append(vsizes, info.VirtualSize)
	}
	if !moveVTPM && len(des) == 0 {
		v, err := m.Status(ctx, d.UUID)
		v.Note = fmt.Sprintf("already on the primary KDK version %d (vTPM key %s): nothing to do", p.Version, old.KeyID)
		if !hasVTPM {
			v.Note = fmt.Sprintf("already on the primary KDK version %d: nothing to do", p.Version)
		}
		return v, err
	}
	if req.Deep {
		if err := m.checkSpace(ctx, d.Name, ptrs(des), keys); err != nil {
			return vmapi.VM{}, err
		}
	}
	src := &source{blobs: map[string][]byte{}}
	var obj domxml.Object
	var newKey *state.Key
	oldDir := ""
	if moveVTPM {
		oldKey, err := m.vtpmKey(ctx, d.Name, d.UUID, old)
		if err != nil {
			return vmapi.VM{}, err
		}
		oldDir = StateDir(m.cfg.VTPMDir, d.UUID, old.KeyID)
		src, err = m.openSource(oldDir, oldKey)
		oldKey.Wipe()
		if err != nil {
			if errors.Is(err, state.ErrLocked) {
				return vmapi.VM{}, fmt.Errorf("vm %q: key %s: %w: its vTPM state is in use (is its nkp-swtpm still running?): %w", d.Name, old.KeyID, ErrRunning, err)
			}
			return vmapi.VM{}, fmt.Errorf("vm %q: key %s: reading the vTPM state: %w; nothing was changed", d.Name, old.KeyID, err)
		}
		obj = domxml.Object{Name: domxml.ObjectVTPM, KeyID: kdk.NewKeyID(), KDKID: p.ID, KDKVersion: p.Version, SwtpmSecret: old.SwtpmSecret, PCRBanks: old.PCRBanks}
		if newKey, err = m.vtpmKey(ctx, d.Name, d.UUID, obj); err != nil {
			src.close(false)
			return vmapi.VM{}, err
		}
		defer newKey.Wipe()
	} else {
		old = domxml.Object{}
	}
	committed := false
	defer func() { src.close(committed) }()
	meta := d.Metadata.Clone()
	if moveVTPM {
		meta.SetObject(obj)
	}
	for _, de := range des {
		meta.SetObject(de.Obj)
	}
	nx, err := domxml.SetMetadata(x, meta)
	for _, de := range des {
		if err != nil {
			break
		}
		nx, err = domxml.SetDisk(nx, de.Target, domxml.DiskEdit{Source: de.New, DriverType: driverType(de.DstFormat),
			Encryption: domxml.LUKS(domxml.SecretUUID(d.UUID, de.Obj.KeyID))})
	}
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w", d.Name, err)
	}
	e := &entry{Op: opRekey, Domain: d.Name, UUID: d.UUID, Old: old, New: obj, Disks: des}
	if moveVTPM {
		e.OldDir, e.NewDir = oldDir, StateDir(m.cfg.VTPMDir, d.UUID, obj.KeyID)
	}
	if err := m.j.write(e); err != nil {
		return vmapi.VM{}, err
	}
	m.step(opRekey, "journal")
	fail := func(err error) (vmapi.VM, error) {
		if rerr := m.recoverOneLocked(ctx, d.UUID); rerr != nil {
			m.log.Warn("vm: rolling back rekey", "vm", d.Name, "err", rerr)
		}
		return vmapi.VM{}, err
	}
	if moveVTPM {
		if err := m.writeState(e.NewDir, newKey, src.blobs, m.cfg.VTPMOwner, 0o711); err != nil {
			return fail(fmt.Errorf("vm %q: key %s: writing the vTPM state: %w", d.Name, obj.KeyID, err))
		}
		m.step(opRekey, "staged")
	}
	for i := range des {
		de := &des[i]
		if de.Mode == modeConvert {
			if err := m.convertDisk(ctx, d.Name, de, keys, vsizes[i], progress, opRekey); err != nil {
				return fail(err)
			}
			continue
		}
		img := qemuimg.Image{Path: de.Orig, Format: de.SrcFormat, Key: keys[de.Old.KeyID]}
		if err := m.qi().AddKey(ctx, img, keys[de.Obj.KeyID], qemuimg.LUKSOptions{}); err != nil {
			return fail(fmt.Errorf("vm %q: disk %s: adding a keyslot for key %s to %s: %w; nothing was changed", d.Name, de.Target, de.Obj.KeyID, de.Orig, err))
		}
		if progress != nil {
			progress(vmapi.Progress{Disk: de.Target, Phase: "done", Done: 1, Size: vsizes[i]})
		}
		m.step(opRekey, "disk-slot-added")
	}
	if err := m.ensureSecrets(ctx, d, diskObjects(des, true)); err != nil {
		return fail(err)
	}
	m.step(opRekey, "secrets")
	if err := m.cfg.Libvirt.DefineXML(ctx, nx); err != nil {
		return fail(fmt.Errorf("vm %q: defining the rekeyed domain: %w", d.Name, err))
	}
	committed = true
	m.step(opRekey, "defined")
	src.close(true)
	src = &source{}
	finish := m.recoverOneLocked(ctx, d.UUID)
	if finish != nil {
		m.log.Warn("vm: rekey: updating the catalog and removing the old keys (retried at hostd's start)", "vm", d.Name, "err", finish)
	}
	var notes []string
	if moveVTPM {
		notes = append(notes, fmt.Sprintf("vTPM moved from key %s (KDK version %d) to key %s (KDK version %d)", old.KeyID, old.KDKVersion, obj.KeyID, obj.KDKVersion))
	}
	for _, de := range des {
		if de.Mode == modeConvert {
			notes = append(notes, fmt.Sprintf("disk %s re-encrypted into %s under key %s (KDK version %d), the old file %s kept until nkpctl vm protect --finalize %s", de.Target, de.New, de.Obj.KeyID, de.Obj.KDKVersion, de.Orig, d.Name))
		} else {
			notes = append(notes, fmt.Sprintf("disk %s moved from key %s (KDK version %d) to key %s (KDK version %d)", de.Target, de.Old.KeyID, de.Old.KDKVersion, de.Obj.KeyID, de.Obj.KDKVersion))
		}
	}
	m.log.Info("vm rekeyed", "vm", d.Name, "uuid", d.UUID, "old_key_id", old.KeyID, "key_id", obj.KeyID, "kdk_version", p.Version, "disks", len(des), "deep", req.Deep)
	v, err := m.Status(ctx, d.UUID)
	v.Problems = appendFinish(v.Problems, finish)
	v.Note = strings.Join(notes, "; ")
	return v, err
}

func isDiskObject(o domxml.Object) bool { return strings.HasPrefix(o.Name, domxml.ObjectDiskPrefix) }

// Unprotect gives a shut-off domain's vTPM back to libvirt: with tpm "keep" (the
// default) its state is written as libvirt's swtpm state and the domain gets
// <backend type='emulator'>: encrypted under the libvirt secret that encrypted it when
// protect adopted it (Object.SwtpmSecret; the secret must still exist, or nothing is
// changed), else unencrypted, as it was before protect, and the answer says so; with
// "none" the vTPM and its state are removed. nkp's metadata and catalog entry go.
func (m *Manager) Unprotect(ctx context.Context, domain, tpm string) (vmapi.VM, error) {
	return m.UnprotectWith(ctx, domain, tpm, nil)
}

// UnprotectWith is Unprotect with each disk decrypted back into a plain file (the
// encrypted one kept until finalize) and progress as ProtectWith.
func (m *Manager) UnprotectWith(ctx context.Context, domain, tpm string, progress ProgressFunc) (vmapi.VM, error) {
	if tpm == "" {
		tpm = vmapi.UnprotectKeep
	}
	if tpm != vmapi.UnprotectKeep && tpm != vmapi.UnprotectNone {
		return vmapi.VM{}, fmt.Errorf("vm %q: unprotect: %w: tpm %q: want %q or %q", domain, ErrBadArgument, tpm, vmapi.UnprotectKeep, vmapi.UnprotectNone)
	}
	m.lock("unprotect of "+domain, progress)
	defer m.unlock()
	x, d, err := m.prepare(ctx, domain, "unprotect")
	if err != nil {
		return vmapi.VM{}, err
	}
	old, hasVTPM := d.Metadata.Object(domxml.ObjectVTPM)
	if d.Metadata == nil || !hasVTPM && !slices.ContainsFunc(d.Metadata.Objects, isDiskObject) {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w: nothing to unprotect", d.Name, ErrNotProtected)
	}
	if err := m.ownProvider(d); err != nil {
		return vmapi.VM{}, err
	}
	keys := keyring{}
	defer keys.wipe()
	var des []diskEntry
	var vsizes []int64
	for _, o := range d.Metadata.Objects {
		if !isDiskObject(o) {
			continue
		}
		target := strings.TrimPrefix(o.Name, domxml.ObjectDiskPrefix)
		dk, ok := d.Disk(target)
		if !ok || dk.Type != "file" || dk.Source == "" {
			return vmapi.VM{}, fmt.Errorf("vm %q: %w: its metadata names disk %s (key %s), but the domain has no file disk %s: restore the disk with virsh edit", d.Name, ErrUnsupported, target, o.KeyID, target)
		}
		f, err := imgFormat(dk.DriverType, true)
		if err != nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: %w: disk %s: %w", d.Name, ErrUnsupported, target, err)
		}
		k, err := m.diskKey(ctx, d.Name, d.UUID, o)
		if err != nil {
			return vmapi.VM{}, err
		}
		keys[o.KeyID] = k
		dst := qemuimg.Raw
		if f == qemuimg.QCOW2 {
			dst = qemuimg.QCOW2
		}
		de := diskEntry{Target: target, Orig: dk.Source, New: newDiskPath(dk.Source, dst, o.KeyID, true), Old: o, Mode: modeConvert, SrcFormat: f, DstFormat: dst}
		if _, err := os.Lstat(de.New); err == nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: disk %s: %s exists already, and nkp does not overwrite a file it did not make: move it away and run the command again", d.Name, target, de.New)
		}
		info, err := m.qi().Info(ctx, qemuimg.Image{Path: dk.Source, Format: f, Key: k})
		if err == nil {
			err = m.qi().Unlock(ctx, qemuimg.Image{Path: dk.Source, Format: f, Key: k})
		}
		if err != nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: disk %s key %s: opening %s: %w; nothing was changed", d.Name, target, o.KeyID, dk.Source, err)
		}
		des = append(des, de)
		vsizes = append(vsizes, info.VirtualSize)
	}
	if err := m.checkSpace(ctx, d.Name, ptrs(des), keys); err != nil {
		return vmapi.VM{}, err
	}
	tp, _ := d.TPM()
	model := ""
	if tp != nil {
		model = tp.Model
	}
	e := &entry{Op: opUnprotect, Domain: d.Name, UUID: d.UUID, Old: old, Disks: des}
	if hasVTPM {
		e.OldDir = StateDir(m.cfg.VTPMDir, d.UUID, old.KeyID)
	}
	src := &source{blobs: map[string][]byte{}}
	var emu *domxml.TPM
	var swKey *state.Key // libvirt's swtpm key when the adopted state was encrypted
	if hasVTPM && tpm == vmapi.UnprotectKeep {
		key, err := m.vtpmKey(ctx, d.Name, d.UUID, old)
		if err != nil {
			return vmapi.VM{}, fmt.Errorf("%w; to drop the vTPM and its state instead, use --tpm none", err)
		}
		src, err = m.openSource(e.OldDir, key)
		key.Wipe()
		if err != nil {
			if errors.Is(err, state.ErrLocked) {
				return vmapi.VM{}, fmt.Errorf("vm %q: key %s: %w: its vTPM state is in use: %w", d.Name, old.KeyID, ErrRunning, err)
			}
			return vmapi.VM{}, fmt.Errorf("vm %q: key %s: reading the vTPM state: %w; nothing was changed", d.Name, old.KeyID, err)
		}
		emu = &domxml.TPM{Model: model, Backend: domxml.BackendEmulator, Version: "2.0", EncryptionSecret: old.SwtpmSecret}
		if old.PCRBanks != "" {
			emu.ActivePCRBanks = strings.Split(old.PCRBanks, ",")
		}
		if emu.Model == "" {
			emu.Model = "tpm-crb"
		}
		if old.SwtpmSecret != "" {
			if swKey, err = m.swtpmSecretKey(ctx, d.Name, old.SwtpmSecret); err != nil {
				src.close(false)
				return vmapi.VM{}, err
			}
			defer swKey.Wipe()
		}
		// A vTPM that never ran has no state: libvirt then creates and manufactures
		// its own at the next start (swtpm_setup), as for any new emulator TPM.
		if len(src.blobs) > 0 {
			e.Emulator = emu.EmulatorStateDir(m.cfg.SwtpmRoot, d.UUID)
			e.Staging = e.Emulator + ".nkp-new"
			if _, err := os.Lstat(e.Emulator); err == nil {
				e.EmulatorExisted = true
				e.Aside = e.Emulator + ".before-nkp-" + strconv.FormatInt(time.Now().Unix(), 10)
			}
		}
	}
	committed := false
	defer func() { src.close(committed) }()
	nx, err := domxml.SetMetadata(x, nil)
	if err == nil && hasVTPM {
		nx, err = domxml.SetTPM(nx, emu)
	}
	for _, de := range des {
		if err != nil {
			break
		}
		nx, err = domxml.SetDisk(nx, de.Target, domxml.DiskEdit{Source: de.New, DriverType: driverType(de.DstFormat)})
	}
	if err != nil {
		return vmapi.VM{}, fmt.Errorf("vm %q: %w", d.Name, err)
	}
	if err := m.j.write(e); err != nil {
		return vmapi.VM{}, err
	}
	m.step(opUnprotect, "journal")
	fail := func(err error) (vmapi.VM, error) {
		if rerr := m.recoverOneLocked(ctx, d.UUID); rerr != nil {
			m.log.Warn("vm: rolling back unprotect", "vm", d.Name, "err", rerr)
		}
		return vmapi.VM{}, err
	}
	if e.Emulator != "" {
		os.RemoveAll(e.Staging) // a leftover of an earlier attempt
		if err := m.writeEmulatorState(e.Staging, swKey, src.blobs); err != nil {
			return fail(fmt.Errorf("vm %q: writing libvirt's swtpm state %s: %w", d.Name, e.Staging, err))
		}
		os.Remove(filepath.Join(e.Staging, ".lock")) // libvirt's swtpm creates its own
		if e.Aside != "" {
			if err := os.Rename(e.Emulator, e.Aside); err != nil {
				return fail(fmt.Errorf("vm %q: moving the existing %s aside: %w", d.Name, e.Emulator, err))
			}
		}
		if err := os.Rename(e.Staging, e.Emulator); err != nil {
			return fail(fmt.Errorf("vm %q: %w", d.Name, err))
		}
		if err := atomicfile.SyncDir(filepath.Dir(e.Emulator)); err != nil {
			return fail(fmt.Errorf("vm %q: %w", d.Name, err))
		}
		m.step(opUnprotect, "staged")
	}
	for i := range des {
		if err := m.convertDisk(ctx, d.Name, &des[i], keys, vsizes[i], progress, opUnprotect); err != nil {
			return fail(err)
		}
	}
	if err := m.cfg.Libvirt.DefineXML(ctx, nx); err != nil {
		return fail(fmt.Errorf("vm %q: defining the unprotected domain: %w", d.Name, err))
	}
	committed = true
	m.step(opUnprotect, "defined")
	src.close(true)
	src = &source{}
	finish := m.recoverOneLocked(ctx, d.UUID)
	if finish != nil {
		m.log.Warn("vm: unprotect: removing the catalog entry and nkp's state (retried at hostd's start)", "vm", d.Name, "err", finish)
	}
	m.log.Info("vm unprotected", "vm", d.Name, "uuid", d.UUID, "key_id", old.KeyID, "tpm", tpm)
	v, err := m.Status(ctx, d.UUID)
	v.Problems = appendFinish(v.Problems, finish)
	switch {
	case !hasVTPM:
		v.Note = "no vTPM to change"
	case e.Emulator != "" && swKey != nil:
		v.Note = "the vTPM is libvirt's swtpm again, its state in " + e.Emulator + " encrypted as before protect, under libvirt secret " + old.SwtpmSecret
		if e.Aside != "" {
			v.Note += "; the directory that was there is kept as " + e.Aside
		}
	case e.Emulator != "":
		v.Note = "the vTPM is libvirt's swtpm again, its state in " + e.Emulator + " UNENCRYPTED (it was unencrypted before protect; for libvirt's own encryption define a secret and add <encryption secret='UUID'/> to the TPM's backend before protecting)"
		if e.Aside != "" {
			v.Note += "; the directory that was there is kept as " + e.Aside
		}
	case emu != nil:
		v.Note = "the vTPM is libvirt's swtpm again; it had no state yet, so libvirt creates it at the next start"
	default:
		v.Note = "the vTPM and its state were removed"
	}
	for _, de := range des {
		v.Note += fmt.Sprintf("; disk %s decrypted into %s, the encrypted %s kept until nkpctl vm protect --finalize %s", de.Target, de.New, de.Orig, d.Name)
	}
	return v, err
}

func (m *Manager) ownProvider(d *domxml.Domain) error {
	if p := m.cfg.Keys.ProviderID(); d.Metadata.ProviderID != p {
		return fmt.Errorf("vm %q: its keys come from provider %s, this host is joined to provider %s: run the command on a host of that provider", d.Name, d.Metadata.ProviderID, p)
	}
	return nil
}

// appendFinish adds the sentence for a committed operation whose remaining steps failed.
func appendFinish(problems []string, finish error) []string {
	if finish == nil {
		return problems
	}
	return append(problems, fmt.Sprintf("the change is made, but finishing it failed (%v); hostd retries at its next start and before the next nkpctl vm command on this VM", finish))
}
