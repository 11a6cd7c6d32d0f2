// Package disksecret keeps the libvirt secrets of protected disks defined: one ephemeral,
// private secret per disk object of a domain's nkp metadata (domxml name "disk:<target>"),
// UUID domxml.SecretUUID(vmUUID, keyID), value the lowercase hex of the key derived for
// (kdk.PurposeDisk, vmUUID, keyID) — the LUKS passphrase QEMU opens the disk with.
//
// A Manager holds the set of secrets hostd keeps defined and what it knows about each
// (defined by it, failed and why, the disk image known not to open under the key). It
// changes libvirt from its own goroutine (Run) or from the VM operations (Ensure, Remove;
// it implements hostd/vm.Secrets), never from a hook: hooks ask Check, which reads memory
// only, and Kick, which queues work for Run.
//
// What is defined: for every domain libvirt knows, the disk objects of its persistent
// definition and, while it runs, of its live one (a shallow rekey of a running VM changes
// the persistent one; QEMU and a migration still use the live one), whose KDK version
// this host holds. Reconcile defines what is missing from libvirt (secrets vanish when
// libvirtd restarts: they are ephemeral), and undefines nkp's secrets (recognised by
// the description prefix virt.SecretPrefix) that no domain uses. Secrets defined by
// Ensure stay until Remove or until a reconcile sees a domain use them; secrets defined
// for a hook's domain (Kick, e.g. an incoming migration not yet known to libvirt) stay
// at least KickGrace.
//
// Optionally (Config.Verify) the manager checks, after it defines a secret, that the
// disk's image opens under the key (in a goroutine of Run, outside any hook, the key
// derived again for it; verdicts cached by path, size and modification time), so that
// Check refuses a disk whose image was made under another key and names it, instead of
// QEMU failing with a bare "Invalid password". A start before the verdict is allowed;
// an image is verified when its secret is (re)defined, not on every reconcile, and again
// in the background after its VM stopped (Reverify, from the release hook). The hook
// also asks CheckImages: one stat per disk, compared with the file last verified (device,
// inode, size, mtime, ctime); a file that differs (another image copied or renamed over
// it) is verified again inline, in the hook, so a swapped image is refused at once.
//
// Importers: hostd. Unit tests use fakes of Libvirt and Keys; hostd's tests use a real
// libvirtd.
package disksecret

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/hostd/virt"
)

// KickGrace is how long a secret defined for a hook's domain (Kick) is kept although no
// domain libvirt knows uses it: an incoming migration's domain appears only later.
const KickGrace = 10 * time.Minute

// DiskPrefix starts the metadata object name of a disk.
const DiskPrefix = domxml.ObjectDiskPrefix

// Libvirt is what the manager needs of libvirt; *hostd/virt.Conn is one.
type Libvirt interface {
	Definitions(ctx context.Context) ([]virt.Definition, error)
	Definition(ctx context.Context, uuid string) (virt.Definition, bool, error)
	DefineSecret(ctx context.Context, s virt.Secret, value []byte) error
	UndefineSecret(ctx context.Context, uuid string) error
	ListSecrets(ctx context.Context) ([]virt.SecretInfo, error)
	SecretExists(ctx context.Context, uuid string) (bool, error)
}

// Keys derives disk keys.
type Keys interface {
	// DiskKey returns the 32-byte key of disk object o of VM vmUUID (the caller wipes
	// it); an error wrapping kdkcache.ErrUnknownVersion when this host does not hold
	// o's KDK version.
	DiskKey(ctx context.Context, vmUUID string, o domxml.Object) ([]byte, error)
}

// Verifier checks that a disk image opens under a passphrase.
type Verifier interface {
	// Opens returns nil when the image at path (format "qcow2" or "raw" as the
	// domain's <driver type>) opens under passphrase, an error wrapping ErrWrongKey when
	// it does not, another error when it cannot tell.
	Opens(ctx context.Context, path, format string, passphrase []byte) error
}

// ErrWrongKey: the disk image does not open under its key.
var ErrWrongKey = errors.New("the disk image does not open under its key")

// Config configures a Manager.
type Config struct {
	Libvirt Libvirt
	Keys    Keys
	// Disks returns the image path and format of the disk of target dev in a domain
	// XML, "" when it has none or its <encryption> does not name secretUUID; with
	// Verify, needed to verify images. Nil: no verification.
	Disks func(domainXML []byte, target, secretUUID string) (path, format string)
	// Verify, if set, checks each disk image under its key after its secret is defined
	// (in the background: a start right after a definition is not delayed by it).
	Verify Verifier
	Log    *slog.Logger
	// Now is the clock (tests); nil is time.Now.
	Now func() time.Time
}

// Reason says why a disk is not ready.
type Reason int

// Reasons.
const (
	Pending     Reason = iota + 1 // not defined (yet) by this hostd: being defined
	NoKey                         // its key cannot be derived on this host (Err says why)
	DefineError                   // libvirt refused the secret (Err says why)
	WrongKey                      // its image does not open under its key (Path)
)

// NotReady is why a disk of a domain cannot start: Check's answer.
type NotReady struct {
	Object domxml.Object
	Target string // the disk's target dev ("vda")
	Reason Reason
	Err    error  // NoKey, DefineError
	Path   string // WrongKey: the image
}

func (n *NotReady) Error() string {
	switch n.Reason {
	case NoKey:
		return fmt.Sprintf("disk %s (key %s, KDK v%d): its key cannot be derived on this host: %v", n.Target, n.Object.KeyID, n.Object.KDKVersion, n.Err)
	case DefineError:
		return fmt.Sprintf("disk %s (key %s, KDK v%d): libvirt refused its secret: %v", n.Target, n.Object.KeyID, n.Object.KDKVersion, n.Err)
	case WrongKey:
		return fmt.Sprintf("disk %s (key %s, KDK v%d): its image %s does not open under this key", n.Target, n.Object.KeyID, n.Object.KDKVersion, n.Path)
	}
	return fmt.Sprintf("disk %s (key %s, KDK v%d): its libvirt secret is not defined on this host yet", n.Target, n.Object.KeyID, n.Object.KDKVersion)
}

type state int

const (
	statePending state = iota // to be defined (or being defined)
	stateDefined
	stateNoKey
	stateError
)

// entry is one secret the manager keeps (or tried to).
type entry struct {
	vmUUID, vmName string
	obj            domxml.Object
	state          state
	err            error
	since          time.Time // when the entry was last defined or kicked
	pinned         bool      // defined by Ensure: kept until Remove or used by a domain
	kicked         bool      // defined for a hook: kept at least KickGrace
	wrongKey       string    // the image known not to open under the key ("" = not known)
	path, format   string    // the disk's image, for verification ("" = unknown)
}

// kick is a hook's request to define a VM's secrets from its XML.
type kick struct {
	vmUUID, vmName string
	objs           []domxml.Object
	xml            []byte
}

// Stats are the manager's figures for metrics.
type Stats struct {
	Defined         int    // secrets defined by this hostd now
	ReconcileErrors uint64 // reconciles (or parts of one) that failed, since start
}

// Manager keeps the disk secrets of this host's protected domains. Safe for concurrent use.
type Manager struct {
	cfg Config
	log *slog.Logger
	now func() time.Time

	op sync.Mutex // one change of libvirt's secrets at a time

	mu      sync.RWMutex
	entries map[string]*entry // secret UUID →; guarded by mu
	errs    uint64            // guarded by mu

	qmu    sync.Mutex
	forget bool            // Forget is queued; guarded by qmu
	all    bool            // a full reconcile is queued; guarded by qmu
	vms    map[string]bool // VMs to reconcile; guarded by qmu
	kicks  map[string]kick // hook requests by VM; guarded by qmu
	wake   chan struct{}

	vcache verifyCache
	vmu    sync.Mutex
	vjobs  map[string]want // secret UUID → image to verify; guarded by vmu
	vwake  chan struct{}
}

// New returns a manager; Run makes it work through its queue.
func New(cfg Config) (*Manager, error) {
	if cfg.Libvirt == nil || cfg.Keys == nil {
		return nil, errors.New("disksecret: Config.Libvirt and Config.Keys are required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{cfg: cfg, log: cfg.Log, now: cfg.Now, entries: map[string]*entry{}, vms: map[string]bool{}, kicks: map[string]kick{}, wake: make(chan struct{}, 1),
		vjobs: map[string]want{}, vwake: make(chan struct{}, 1)}
	if m.now == nil {
		m.now = time.Now
	}
	return m, nil
}

// DiskObjects returns the disk objects of a domain's metadata (nil for nil).
func DiskObjects(md *domxml.Metadata) []domxml.Object {
	if md == nil {
		return nil
	}
	var out []domxml.Object
	for _, o := range md.Objects {
		if strings.HasPrefix(o.Name, DiskPrefix) {
			out = append(out, o)
		}
	}
	return out
}

func target(o domxml.Object) string { return strings.TrimPrefix(o.Name, DiskPrefix) }

// Description is the libvirt secret description of disk object o of VM name/uuid.
func Description(vmName, vmUUID string, o domxml.Object) string {
	if vmName == "" {
		vmName = "?"
	}
	return fmt.Sprintf("%sdisk %s of VM %s (%s), key %s", virt.SecretPrefix, target(o), vmName, vmUUID, o.KeyID)
}

// Check says, from memory only (it never calls libvirt: hooks ask it), whether the
// secrets of VM vmUUID's disk objects are defined by this hostd with the right value;
// nil when all are, else why the first one is not.
func (m *Manager) Check(vmUUID string, disks []domxml.Object) *NotReady {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, o := range disks {
		e, ok := m.entries[domxml.SecretUUID(vmUUID, o.KeyID)]
		nr := &NotReady{Object: o, Target: target(o), Reason: Pending}
		switch {
		case !ok || e.obj != o || e.state == statePending:
			return nr
		case e.state == stateNoKey:
			nr.Reason, nr.Err = NoKey, e.err
			return nr
		case e.state == stateError:
			nr.Reason, nr.Err = DefineError, e.err
			return nr
		case e.wrongKey != "":
			nr.Reason, nr.Path = WrongKey, e.wrongKey
			return nr
		}
	}
	return nil
}

// Kick queues the definition of VM vmUUID's disk secrets from a hook's domain XML
// (Run does it). It never blocks.
func (m *Manager) Kick(vmUUID, vmName string, disks []domxml.Object, domainXML []byte) {
	m.qmu.Lock()
	m.kicks[vmUUID] = kick{vmUUID: vmUUID, vmName: vmName, objs: disks, xml: domainXML}
	m.qmu.Unlock()
	m.signal()
}

// RequestForget queues Forget (the host was revoked). It never blocks: a revocation can
// be noticed while a hook is answered.
func (m *Manager) RequestForget() {
	m.qmu.Lock()
	m.forget = true
	m.qmu.Unlock()
	m.signal()
}

// Forget undefines every nkp secret libvirt holds and forgets them all. With the keys
// gone (a revoked host), later reconciles define nothing again.
func (m *Manager) Forget(ctx context.Context) error {
	m.op.Lock()
	defer m.op.Unlock()
	listed, _, err := m.listed(ctx)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.entries = map[string]*entry{}
	m.mu.Unlock()
	var errs []error
	for _, s := range listed {
		if err := m.cfg.Libvirt.UndefineSecret(ctx, s.UUID); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		m.countError()
		return fmt.Errorf("disk secrets: undefining them all: %w", err)
	}
	m.log.Info("disk secrets undefined", "count", len(listed))
	return nil
}

// RequestAll queues a full reconcile (libvirtd reconnected, a new KDK version, periodic).
func (m *Manager) RequestAll() {
	m.qmu.Lock()
	m.all = true
	m.qmu.Unlock()
	m.signal()
}

// RequestVM queues the reconcile of one domain (defined, undefined).
func (m *Manager) RequestVM(uuid string) {
	m.qmu.Lock()
	m.vms[uuid] = true
	m.qmu.Unlock()
	m.signal()
}

func (m *Manager) signal() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// Disconnected forgets that secrets are defined: libvirtd may be restarting, which
// drops every ephemeral secret. Until the next reconcile, Check answers Pending.
func (m *Manager) Disconnected() {
	m.mu.Lock()
	for _, e := range m.entries {
		if e.state == stateDefined {
			e.state = statePending
		}
	}
	m.mu.Unlock()
}

// SecretEvent handles another process's change of secret uuid (defined, value set,
// undefined): one of ours is defined again with the right value.
func (m *Manager) SecretEvent(uuid string) {
	m.mu.Lock()
	e, ok := m.entries[uuid]
	var vmUUID string
	if ok {
		vmUUID = e.vmUUID
		if e.state == stateDefined {
			e.state = statePending
		}
	}
	m.mu.Unlock()
	if !ok {
		return // not one of ours; a stale nkp secret is removed by the next full reconcile
	}
	m.log.Warn("another process changed or undefined an nkp disk secret: defining it again", "secret", uuid, "uuid", vmUUID)
	m.RequestVM(vmUUID)
}

// Stats returns the figures for metrics.
func (m *Manager) Stats() Stats {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s := Stats{ReconcileErrors: m.errs}
	for _, e := range m.entries {
		if e.state == stateDefined {
			s.Defined++
		}
	}
	return s
}

// Run works through the queue (and, in another goroutine, the images to verify) until
// ctx ends.
func (m *Manager) Run(ctx context.Context) {
	done := make(chan struct{})
	defer func() { <-done }()
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-m.vwake:
				m.verifyQueued(ctx)
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.wake:
		}
		m.qmu.Lock()
		forget, all, vms, kicks := m.forget, m.all, m.vms, m.kicks
		m.forget, m.all, m.vms, m.kicks = false, false, map[string]bool{}, map[string]kick{}
		m.qmu.Unlock()
		if forget {
			if err := m.Forget(ctx); err != nil {
				m.log.Error("disk secrets: undefining them all failed; retried at the next reconcile", "err", err)
				m.qmu.Lock()
				m.forget = true // keep trying with the next wake-up
				m.qmu.Unlock()
			}
			continue
		}
		for _, k := range kicks {
			if err := m.define(ctx, k.vmUUID, k.vmName, k.objs, k.xml, func(e *entry) { e.kicked = true }); err != nil {
				m.log.Warn("disk secrets: defining a hook's disk secrets failed; the next start retries", "uuid", k.vmUUID, "vm", k.vmName, "err", err)
			}
		}
		if all {
			if err := m.Reconcile(ctx); err != nil {
				m.log.Warn("disk secrets: reconcile failed; retried at the next event or period", "err", err)
			}
			continue
		}
		for uuid := range vms {
			if err := m.ReconcileVM(ctx, uuid); err != nil {
				m.log.Warn("disk secrets: reconcile of a VM failed; retried at the next event or period", "uuid", uuid, "err", err)
			}
		}
	}
}

// want is one secret some domain needs.
type want struct {
	vmUUID, vmName string
	obj            domxml.Object
	path, format   string // the disk's image ("" = unknown)
}

func (m *Manager) wantOf(vmUUID, vmName string, o domxml.Object, xml []byte) want {
	w := want{vmUUID: vmUUID, vmName: vmName, obj: o}
	if m.cfg.Disks != nil && xml != nil {
		w.path, w.format = m.cfg.Disks(xml, target(o), domxml.SecretUUID(vmUUID, o.KeyID))
	}
	return w
}

// wants returns the disk secrets domain d needs: its persistent and live definitions'.
func (m *Manager) wants(d virt.Definition) map[string]want {
	out := map[string]want{}
	for _, x := range [][]byte{d.Live, d.Inactive} { // persistent last: its XML wins for the image path
		if x == nil {
			continue
		}
		dom, err := domxml.Parse(x)
		if err != nil {
			m.log.Warn("disk secrets: a domain's XML cannot be read", "uuid", d.UUID, "err", err)
			continue
		}
		for _, o := range DiskObjects(dom.Metadata) {
			out[domxml.SecretUUID(dom.UUID, o.KeyID)] = m.wantOf(dom.UUID, dom.Name, o, x)
		}
	}
	return out
}

// Reconcile makes libvirt hold the secrets every domain needs, and only those (besides
// the ones Ensure and Kick keep).
func (m *Manager) Reconcile(ctx context.Context) error {
	m.op.Lock()
	defer m.op.Unlock()
	defs, err := m.cfg.Libvirt.Definitions(ctx)
	if err != nil {
		m.countError()
		return fmt.Errorf("disk secrets: %w", err)
	}
	listed, inLibvirt, err := m.listed(ctx)
	if err != nil {
		return err
	}
	all := map[string]want{}
	for _, d := range defs {
		for u, w := range m.wants(d) {
			all[u] = w
		}
	}
	// Stale: nkp's secrets in libvirt and entries no domain needs.
	stale := map[string]bool{}
	for _, s := range listed {
		if _, ok := all[s.UUID]; !ok {
			stale[s.UUID] = true
		}
	}
	m.mu.RLock()
	for u := range m.entries {
		if _, ok := all[u]; !ok {
			stale[u] = true
		}
	}
	m.mu.RUnlock()
	return m.apply(ctx, all, sortedKeys(stale), inLibvirt)
}

// apply defines the secrets in need (in UUID order), then settles the stale ones, and
// returns every error joined (counted once).
func (m *Manager) apply(ctx context.Context, need map[string]want, stale []string, inLibvirt map[string]bool) error {
	var errs []error
	for _, u := range sortedKeys(need) {
		if err := m.ensureOne(ctx, need[u], inLibvirt[u]); err != nil {
			errs = append(errs, err)
		}
	}
	for _, u := range stale {
		if err := m.settle(ctx, u, inLibvirt[u]); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		m.countError()
		return err
	}
	return nil
}

// listed returns nkp's secrets in libvirt, also as a set.
func (m *Manager) listed(ctx context.Context) ([]virt.SecretInfo, map[string]bool, error) {
	listed, err := m.cfg.Libvirt.ListSecrets(ctx)
	if err != nil {
		m.countError()
		return nil, nil, fmt.Errorf("disk secrets: %w", err)
	}
	in := map[string]bool{}
	for _, s := range listed {
		in[s.UUID] = true
	}
	return listed, in, nil
}

// ReconcileVM does what Reconcile does for one domain: defines the secrets it needs,
// undefines this manager's secrets of that VM it no longer needs.
func (m *Manager) ReconcileVM(ctx context.Context, vmUUID string) error {
	m.op.Lock()
	defer m.op.Unlock()
	d, known, err := m.cfg.Libvirt.Definition(ctx, vmUUID)
	if err != nil {
		m.countError()
		return fmt.Errorf("disk secrets of VM %s: %w", vmUUID, err)
	}
	need := map[string]want{}
	if known {
		need = m.wants(d)
	}
	// Only this VM's secrets are looked up (a full listing reads every secret's XML):
	// those it needs and those this manager holds for it.
	lookup := map[string]bool{}
	for u := range need {
		lookup[u] = true
	}
	m.mu.RLock()
	for u, e := range m.entries {
		if e.vmUUID == vmUUID {
			lookup[u] = true
		}
	}
	m.mu.RUnlock()
	inLibvirt := map[string]bool{}
	for u := range lookup {
		ok, err := m.cfg.Libvirt.SecretExists(ctx, u)
		if err != nil {
			m.countError()
			return fmt.Errorf("disk secrets of VM %s: %w", vmUUID, err)
		}
		inLibvirt[u] = ok
	}
	var stale []string
	m.mu.RLock()
	for u, e := range m.entries {
		if _, ok := need[u]; !ok && e.vmUUID == vmUUID {
			stale = append(stale, u)
		}
	}
	m.mu.RUnlock()
	sort.Strings(stale)
	return m.apply(ctx, need, stale, inLibvirt)
}

// settle handles secret u that no domain needs: it is undefined unless Ensure pinned it
// or a hook kicked it recently; such a secret is defined again if libvirt lost it
// (present is whether libvirt lists it).
func (m *Manager) settle(ctx context.Context, u string, present bool) error {
	m.mu.RLock()
	e, ok := m.entries[u]
	keep := ok && (e.pinned || (e.kicked && m.now().Sub(e.since) < KickGrace))
	var w want
	var pinned bool
	if ok {
		w, pinned = want{vmUUID: e.vmUUID, vmName: e.vmName, obj: e.obj, path: e.path, format: e.format}, e.pinned
	}
	again := keep && (!present || e.state != stateDefined)
	m.mu.RUnlock()
	if keep {
		if !again {
			return nil
		}
		return m.defineOne(ctx, w, func(e *entry) { e.pinned = pinned }) // since is renewed: a kick's grace restarts
	}
	if err := m.cfg.Libvirt.UndefineSecret(ctx, u); err != nil {
		return fmt.Errorf("disk secret %s: %w", u, err)
	}
	m.mu.Lock()
	delete(m.entries, u)
	m.mu.Unlock()
	m.log.Info("disk secret no domain uses: undefined", "secret", u)
	return nil
}

// ensureOne defines w's secret for a domain that uses it, unless this manager defined it
// already with the same object and libvirt still holds it (present).
func (m *Manager) ensureOne(ctx context.Context, w want, present bool) error {
	u := domxml.SecretUUID(w.vmUUID, w.obj.KeyID)
	m.mu.Lock()
	e, ok := m.entries[u]
	if ok && e.obj == w.obj && e.state == stateDefined && present && e.path == w.path {
		e.vmName = w.vmName
		e.pinned = false // a domain uses it now
		m.mu.Unlock()
		return nil
	}
	m.mu.Unlock()
	return m.defineOne(ctx, w, nil)
}

// defineOne derives w's key and defines its secret, recording the outcome.
func (m *Manager) defineOne(ctx context.Context, w want, mark func(*entry)) error {
	u := domxml.SecretUUID(w.vmUUID, w.obj.KeyID)
	rec := func(st state, err error, wrong string) {
		m.mu.Lock()
		e, ok := m.entries[u]
		if !ok {
			e = &entry{}
			m.entries[u] = e
		}
		e.vmUUID, e.vmName, e.obj, e.state, e.err, e.since, e.wrongKey = w.vmUUID, w.vmName, w.obj, st, err, m.now(), wrong
		e.path, e.format = w.path, w.format
		if mark != nil {
			mark(e)
		} else {
			e.pinned = false
		}
		m.mu.Unlock()
	}
	key, err := m.cfg.Keys.DiskKey(ctx, w.vmUUID, w.obj)
	if err != nil {
		rec(stateNoKey, err, "")
		if errors.Is(err, kdkcache.ErrUnknownVersion) {
			m.log.Debug("disk secret not defined: this host does not hold its KDK version", "uuid", w.vmUUID, "disk", target(w.obj), "kdk_version", w.obj.KDKVersion)
			return nil // not an error of the reconcile: defined when the version arrives
		}
		return fmt.Errorf("VM %s disk %s (key %s): %w", w.vmName, target(w.obj), w.obj.KeyID, err)
	}
	pass := make([]byte, hex.EncodedLen(len(key)))
	hex.Encode(pass, key)
	clear(key)
	defer clear(pass)
	err = m.cfg.Libvirt.DefineSecret(ctx, virt.Secret{UUID: u, Description: Description(w.vmName, w.vmUUID, w.obj)}, pass)
	if err != nil {
		rec(stateError, err, "")
		return fmt.Errorf("VM %s disk %s (key %s): %w", w.vmName, target(w.obj), w.obj.KeyID, err)
	}
	wrong, known := m.verdict(w, u)
	rec(stateDefined, nil, wrong)
	if !known {
		m.queueVerify(u, w)
	}
	m.log.Debug("disk secret defined", "uuid", w.vmUUID, "vm", w.vmName, "disk", target(w.obj), "key_id", w.obj.KeyID, "secret", u)
	return nil
}

// define defines the secrets of objs of one VM (a hook's Kick, Ensure).
func (m *Manager) define(ctx context.Context, vmUUID, vmName string, objs []domxml.Object, xml []byte, mark func(*entry)) error {
	m.op.Lock()
	defer m.op.Unlock()
	var errs []error
	for _, o := range objs {
		if !strings.HasPrefix(o.Name, DiskPrefix) {
			continue
		}
		if err := m.defineOne(ctx, m.wantOf(vmUUID, vmName, o, xml), mark); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		m.countError()
		return err
	}
	return nil
}

// Ensure implements hostd/vm.Secrets: it defines (again) the secrets of VM vmUUID's
// disk objects and returns once libvirt holds them. They stay defined until Remove, or
// until a reconcile finds a domain using them (from then on they live as that domain's).
func (m *Manager) Ensure(ctx context.Context, vmUUID string, disks []domxml.Object) error {
	name, xml := "", []byte(nil)
	if d, ok, err := m.cfg.Libvirt.Definition(ctx, vmUUID); err == nil && ok {
		name, xml = d.Name, d.Inactive
	}
	if err := m.define(ctx, vmUUID, name, disks, xml, func(e *entry) { e.pinned = true }); err != nil {
		return err
	}
	for _, o := range disks {
		if nr := m.Check(vmUUID, []domxml.Object{o}); nr != nil && nr.Reason != WrongKey {
			return fmt.Errorf("VM %s %w", vmUUID, nr)
		}
	}
	return nil
}

// Remove implements hostd/vm.Secrets: it undefines the secrets of VM vmUUID's disk
// objects; one already gone is not an error.
func (m *Manager) Remove(ctx context.Context, vmUUID string, disks []domxml.Object) error {
	m.op.Lock()
	defer m.op.Unlock()
	var errs []error
	for _, o := range disks {
		u := domxml.SecretUUID(vmUUID, o.KeyID)
		if err := m.cfg.Libvirt.UndefineSecret(ctx, u); err != nil {
			errs = append(errs, fmt.Errorf("disk %s (key %s): %w", target(o), o.KeyID, err))
			continue
		}
		m.mu.Lock()
		delete(m.entries, u)
		m.mu.Unlock()
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("VM %s: undefining disk secrets: %w", vmUUID, err)
	}
	return nil
}

func (m *Manager) countError() {
	m.mu.Lock()
	m.errs++
	m.mu.Unlock()
}

func sortedKeys[V any](mp map[string]V) []string {
	out := make([]string, 0, len(mp))
	for k := range mp {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
