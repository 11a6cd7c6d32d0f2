package vm

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
	"golang.org/x/sys/unix"
)

// ErrNoSpace is wrapped by the refusal of a conversion that does not fit.
var ErrNoSpace = errors.New("not enough free space")

// ProgressFunc receives the progress of disk conversions; nil discards it.
type ProgressFunc func(vmapi.Progress)

// Disk conversion modes in the journal.
const (
	modeConvert = "convert" // a new file written from the old one (protect, rekey --deep, unprotect)
	modeShallow = "shallow" // a keyslot added to the same file (rekey)
)

// diskEntry is one disk of a journaled operation.
type diskEntry struct {
	Target string `json:"target"`
	// Orig is the file the domain names before the operation, New the one after (the
	// same file for a shallow rekey).
	Orig string `json:"orig"`
	New  string `json:"new"`
	// Old and Obj are the disk's objects before and after ("" KeyID: plain).
	Old  domxml.Object `json:"old"`
	Obj  domxml.Object `json:"obj"`
	Mode string        `json:"mode"`
	// SrcFormat and DstFormat are the qemu-img formats of Orig and New.
	SrcFormat qemuimg.Format `json:"src_format"`
	DstFormat qemuimg.Format `json:"dst_format"`
	// Created says the operation created New (so a rollback may remove it).
	Created bool `json:"created,omitempty"`
}

// imgFormat is the qemu-img driver of a disk: its <driver type> and whether the domain
// XML gives it <encryption>.
func imgFormat(driverType string, encrypted bool) (qemuimg.Format, error) {
	switch {
	case driverType == "qcow2":
		return qemuimg.QCOW2, nil
	case (driverType == "raw" || driverType == "") && encrypted:
		return qemuimg.LUKS, nil
	case driverType == "raw" || driverType == "":
		return qemuimg.Raw, nil
	}
	return "", fmt.Errorf("driver type %q: nkp converts raw and qcow2 images only (convert it with qemu-img convert -O qcow2 first)", driverType)
}

// nkpSuffix matches the suffixes nkp gives converted files, so a file converted again
// is named after the original, not after the copy.
var nkpSuffix = regexp.MustCompile(`\.nkp-(?:plain-)?[0-9a-f]{8}\.(?:qcow2|luks|img)$`)

// newDiskPath is where a disk's new file goes: next to orig, named
// <orig-base>.nkp-<first 8 of keyID>.<qcow2|luks> (encrypted) or
// <orig-base>.nkp-plain-<first 8 of old keyID>.<qcow2|img> (plain again).
func newDiskPath(orig string, f qemuimg.Format, keyID string, plain bool) string {
	base := nkpSuffix.ReplaceAllString(filepath.Base(orig), "")
	ext := map[qemuimg.Format]string{qemuimg.QCOW2: "qcow2", qemuimg.LUKS: "luks", qemuimg.Raw: "img"}[f]
	tag := "nkp-" + keyID[:8]
	if plain {
		tag = "nkp-plain-" + keyID[:8]
	}
	return filepath.Join(filepath.Dir(orig), base+"."+tag+"."+ext)
}

// diskKey derives a disk object's LUKS passphrase: the lowercase hex of the derived key.
// The caller wipes it.
func (m *Manager) diskKey(ctx context.Context, vmName, vmUUID string, o domxml.Object) ([]byte, error) {
	b, err := m.cfg.Keys.Derive(ctx, KDK{ID: o.KDKID, Version: o.KDKVersion}, kdk.PurposeDisk, vmUUID, o.KeyID)
	if err != nil {
		return nil, fmt.Errorf("vm %q: %s key %s: deriving from KDK version %d: %w: %w", vmName, o.Name, o.KeyID, o.KDKVersion, ErrUnavailable, err)
	}
	defer clear(b)
	h := make([]byte, hex.EncodedLen(len(b)))
	hex.Encode(h, b)
	return h, nil
}

// keyring holds the passphrases of one operation, wiped at its end.
type keyring map[string][]byte

func (k keyring) wipe() {
	for _, b := range k {
		clear(b)
	}
}

func (m *Manager) qi() *qemuimg.Tool {
	if m.cfg.QemuImg != nil {
		return m.cfg.QemuImg
	}
	return &qemuimg.Tool{Logger: m.log}
}

// selectDisks picks the disks protect converts: sel is "all" (or ""), "none" or a
// comma-separated list of target devs. Disks already protected are left out; skipped
// ones come back with the reason.
func selectDisks(d *domxml.Domain, sel string) (chosen []*domxml.Disk, skipped map[string]string, err error) {
	skipped = map[string]string{}
	explicit := sel != "" && sel != vmapi.DisksAll
	var names []string
	if explicit && sel != vmapi.DisksNone {
		for _, n := range strings.Split(sel, ",") {
			n = strings.TrimSpace(n)
			if n == "" {
				continue
			}
			if _, ok := d.Disk(n); !ok {
				var have []string
				for _, x := range d.Disks {
					have = append(have, x.Target)
				}
				return nil, nil, fmt.Errorf("vm %q: %w: --disks names %q, but the domain has no disk with that target (its disks: %s)", d.Name, ErrBadArgument, n, strings.Join(have, ", "))
			}
			if !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
	}
	for i := range d.Disks {
		dk := &d.Disks[i]
		if _, ok := d.Metadata.Object(domxml.DiskObject(dk.Target)); ok {
			continue
		}
		if explicit {
			if slices.Contains(names, dk.Target) {
				if dk.Type != "file" {
					return nil, nil, fmt.Errorf("vm %q: %w: disk %s is of type %q; nkp encrypts file disks only (LUKS for block and network storage is the storage's job)", d.Name, ErrUnsupported, dk.Target, dk.Type)
				}
				chosen = append(chosen, dk)
			}
			continue
		}
		switch {
		case dk.Type != "file":
			skipped[dk.Target] = fmt.Sprintf("skipped: a %s disk, not a file (nkp encrypts file disks)", dk.Type)
		case dk.Device != "disk":
			skipped[dk.Target] = fmt.Sprintf("skipped: a %s (name it with --disks to encrypt it anyway)", dk.Device)
		case dk.ReadOnly:
			skipped[dk.Target] = "skipped: read-only (name it with --disks to encrypt it anyway)"
		case dk.Shareable:
			skipped[dk.Target] = "skipped: shareable, other VMs may use it (name it with --disks to encrypt it anyway)"
		case dk.Source == "":
			skipped[dk.Target] = "skipped: no source file"
		default:
			chosen = append(chosen, dk)
		}
	}
	return chosen, skipped, nil
}

// checkDisk refuses a disk nkp must not encrypt: one with <encryption>, an encrypted
// image (or backing file), an unknown format, a file on dm-crypt unless allowed. It
// returns the qemu-img format of the source and its virtual size.
func (m *Manager) checkDisk(ctx context.Context, d *domxml.Domain, dk *domxml.Disk, allowDouble bool) (qemuimg.Format, int64, error) {
	if dk.Encryption != nil {
		return "", 0, fmt.Errorf("vm %q: %w: disk %s already has <encryption format='%s'> (secret %s): nkp does not encrypt a disk twice; leave it out with --disks", d.Name, ErrUnsupported, dk.Target, dk.Encryption.Format, dk.Encryption.SecretUUID)
	}
	if dk.Source == "" || !filepath.IsAbs(dk.Source) {
		return "", 0, fmt.Errorf("vm %q: %w: disk %s has no absolute source file (%q)", d.Name, ErrUnsupported, dk.Target, dk.Source)
	}
	f, err := imgFormat(dk.DriverType, false)
	if err != nil {
		return "", 0, fmt.Errorf("vm %q: %w: disk %s: %w", d.Name, ErrUnsupported, dk.Target, err)
	}
	chain, err := m.qi().Chain(ctx, qemuimg.Image{Path: dk.Source, Format: f})
	if err != nil {
		return "", 0, fmt.Errorf("vm %q: disk %s: reading %s: %w%s; nothing was changed", d.Name, dk.Target, dk.Source, err, readHint(dk, err))
	}
	for _, in := range chain {
		if in.Encrypted || in.Format == qemuimg.LUKS {
			return "", 0, fmt.Errorf("vm %q: %w: disk %s: the image %s is already encrypted (qemu-img info says so): nkp does not encrypt a disk twice; leave it out with --disks", d.Name, ErrUnsupported, dk.Target, in.Filename)
		}
	}
	if l, crypt, err := m.cfg.Block.Encrypted(dk.Source); err != nil {
		return "", 0, fmt.Errorf("vm %q: disk %s: finding the block devices under %s: %w", d.Name, dk.Target, dk.Source, err)
	} else if crypt && !allowDouble {
		return "", 0, fmt.Errorf("vm %q: %w: disk %s: %s sits on the dm-crypt device %s (%s), so it is encrypted already; encrypting it again costs CPU on every request and defeats deduplication: leave it out with --disks, or say --allow-double-encryption", d.Name, ErrUnsupported, dk.Target, dk.Source, l.Name, l.DMName)
	}
	return f, chain[0].VirtualSize, nil
}

// checkSpace measures each conversion and refuses when a filesystem lacks room for
// the new files it would hold.
func (m *Manager) checkSpace(ctx context.Context, vmName string, des []*diskEntry, keys keyring) error {
	type fsNeed struct {
		dir  string
		need int64
		free int64
		ds   []string
	}
	byDev := map[uint64]*fsNeed{}
	for _, de := range des {
		if de.Mode != modeConvert {
			continue
		}
		src := qemuimg.Image{Path: de.Orig, Format: de.SrcFormat, Key: keys[de.Old.KeyID]}
		dstKey := keys[de.Obj.KeyID]
		me, err := m.qi().Measure(ctx, src, de.DstFormat, dstKey, qemuimg.LUKSOptions{})
		if err != nil {
			return fmt.Errorf("vm %q: disk %s: measuring the conversion of %s: %w; nothing was changed", vmName, de.Target, de.Orig, err)
		}
		dir := filepath.Dir(de.New)
		var st unix.Statfs_t
		var fi unix.Stat_t
		if err := unix.Statfs(dir, &st); err != nil {
			return fmt.Errorf("vm %q: disk %s: %s: %w", vmName, de.Target, dir, err)
		}
		if err := unix.Stat(dir, &fi); err != nil {
			return fmt.Errorf("vm %q: disk %s: %s: %w", vmName, de.Target, dir, err)
		}
		n := byDev[fi.Dev]
		if n == nil {
			n = &fsNeed{dir: dir, free: int64(st.Bavail) * st.Bsize}
			byDev[fi.Dev] = n
		}
		n.need += me.Required
		n.ds = append(n.ds, de.Target)
	}
	for _, n := range byDev {
		// 1% and 16 MiB of slack: metadata, and what other writers take meanwhile.
		if want := n.need + n.need/100 + 16<<20; want > n.free {
			return fmt.Errorf("vm %q: %w: converting disk %s needs %s in %s, which has %s free: free space there (or move the disk files to a larger filesystem), then run the command again; nothing was changed", vmName, ErrNoSpace, strings.Join(n.ds, ", "), size(want), n.dir, size(n.free))
		}
	}
	return nil
}

func size(b int64) string {
	switch {
	case b >= 10<<30:
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", (b+1023)/1024)
}

// convertDisk writes de.New from de.Orig under the keys, owned like the original and
// 0600, and verifies it with qemu-img compare. A failure removes de.New.
func (m *Manager) convertDisk(ctx context.Context, vmName string, de *diskEntry, keys keyring, vsize int64, progress ProgressFunc, op string) (err error) {
	fi, err := os.Stat(de.Orig)
	if err != nil {
		return fmt.Errorf("vm %q: disk %s: %w; nothing was changed", vmName, de.Target, err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	f, err := os.OpenFile(de.New, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("vm %q: disk %s: creating %s: %w (a file of that name is not nkp's to overwrite: move it away)", vmName, de.Target, de.New, err)
	}
	if err != nil {
		return fmt.Errorf("vm %q: disk %s: creating %s: %w: nkp writes the new image next to %s, so its directory must be writable (or move the disk, virsh edit, and run the command again); nothing was changed", vmName, de.Target, de.New, err, de.Orig)
	}
	defer func() {
		if err != nil {
			os.Remove(de.New)
			atomicfile.SyncDir(filepath.Dir(de.New))
		}
	}()
	if err := f.Chown(int(st.Uid), int(st.Gid)); err != nil {
		f.Close()
		return fmt.Errorf("vm %q: disk %s: %s: %w", vmName, de.Target, de.New, err)
	}
	f.Close()
	if err := atomicfile.SyncDir(filepath.Dir(de.New)); err != nil {
		return err
	}
	m.step(op, "disk-created")
	src := qemuimg.Image{Path: de.Orig, Format: de.SrcFormat, Key: keys[de.Old.KeyID]}
	dst := qemuimg.Image{Path: de.New, Format: de.DstFormat, Key: keys[de.Obj.KeyID]}
	report := func(phase string, done float64) {
		if progress != nil {
			progress(vmapi.Progress{Disk: de.Target, Phase: phase, Done: done, Size: vsize})
		}
	}
	report("convert", 0)
	err = m.qi().Convert(ctx, qemuimg.ConvertOptions{Src: src, Dst: dst, OutOfOrder: true,
		Progress: func(x float64) { report("convert", x) }})
	if err != nil {
		if errors.Is(err, qemuimg.ErrNoSpace) {
			return fmt.Errorf("vm %q: %w: disk %s: converting into %s ran out of space (%w); the partial file is removed and nothing else was changed: free space in %s and run the command again", vmName, ErrNoSpace, de.Target, de.New, err, filepath.Dir(de.New))
		}
		if errors.Is(err, qemuimg.ErrLocked) {
			// Another VM that names the same file (not marked <shareable/>) runs on it.
			if ps, perr := openers(m.procDir(), de.Orig); perr == nil && len(ps) > 0 {
				return fmt.Errorf("vm %q: disk %s: converting %s into %s: %w: %s has it open; shut that down first; the partial file is removed and nothing else was changed", vmName, de.Target, de.Orig, de.New, err, ps[0])
			}
		}
		return fmt.Errorf("vm %q: disk %s: converting %s into %s: %w; the partial file is removed and nothing else was changed", vmName, de.Target, de.Orig, de.New, err)
	}
	// qemu-img may create the file anew (qcow2 does, 0644): mode and owner again.
	if err := settle(de.New, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("vm %q: disk %s: %s: %w", vmName, de.Target, de.New, err)
	}
	m.step(op, "disk-converted")
	report("verify", 0)
	if err := m.qi().Compare(ctx, src, dst); err != nil {
		return fmt.Errorf("vm %q: disk %s: %s does not read back the same as %s: %w; the new file is removed and nothing else was changed", vmName, de.Target, de.New, de.Orig, err)
	}
	report("done", 1)
	m.step(op, "disk-verified")
	return nil
}

// settle gives the file at p mode 0600 and the owner uid:gid (through one descriptor,
// never following a link), then fsyncs it.
func settle(p string, uid, gid int) error {
	f, err := os.OpenFile(p, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Chmod(0o600); err != nil {
		return err
	}
	if err := f.Chown(uid, gid); err != nil {
		return err
	}
	return f.Sync()
}

// kept is a file that an operation replaced and keeps until finalize.
type kept struct {
	Target     string    `json:"target"`
	Path       string    `json:"path"`
	ReplacedBy string    `json:"replaced_by"`
	Op         string    `json:"op"`
	Time       time.Time `json:"time"`
	// VM is the domain's name when the file was kept: finalize finds the kept files of
	// a domain libvirt no longer defines by it (or by the UUID).
	VM string `json:"vm,omitempty"`
}

// keptPath is JournalDir/<uuid>.kept: the original disk files of a VM kept for finalize.
func (m *Manager) keptPath(uuid string) string { return filepath.Join(m.j.dir, uuid+".kept") }

func (m *Manager) readKept(uuid string) ([]kept, error) {
	b, err := os.ReadFile(m.keptPath(uuid))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ks []kept
	if err := json.Unmarshal(b, &ks); err != nil {
		return nil, fmt.Errorf("%s: %w (move it away; the files it lists stay where they are)", m.keptPath(uuid), err)
	}
	return ks, nil
}

func (m *Manager) writeKept(uuid string, ks []kept) error {
	if len(ks) == 0 {
		if err := os.Remove(m.keptPath(uuid)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return atomicfile.SyncDir(m.j.dir)
	}
	b, err := json.MarshalIndent(ks, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(m.keptPath(uuid), append(b, '\n'), 0o600)
}

// keep records orig as kept (once).
func (m *Manager) keep(uuid string, k kept) error {
	ks, err := m.readKept(uuid)
	if err != nil {
		return err
	}
	if slices.ContainsFunc(ks, func(x kept) bool { return x.Path == k.Path }) {
		return nil
	}
	return m.writeKept(uuid, append(ks, k))
}

// referenced says whether a domain's disks name path as a source or first backing file.
func referenced(d *domxml.Domain, path string) bool {
	for _, dk := range d.Disks {
		if dk.Source == path || dk.BackingStore == path {
			return true
		}
	}
	return false
}

// readHint adds the way out to a failure to read a disk's image chain that qemu-img's
// own words leave open: a <driver type> that does not match the file, a missing backing
// file (the file the domain names is there).
func readHint(dk *domxml.Disk, err error) string {
	var qe *qemuimg.Error
	if !errors.As(err, &qe) {
		return ""
	}
	switch {
	case strings.Contains(qe.Detail, "Image is not in "+dk.DriverType+" format"):
		return fmt.Sprintf(": the domain says <driver type='%s'>, but the file is not %s: check its format with qemu-img info %s and fix <driver type> with virsh edit", dk.DriverType, dk.DriverType, dk.Source)
	case errors.Is(err, qemuimg.ErrNotFound):
		if _, serr := os.Stat(dk.Source); serr == nil {
			return ": the file is there, so a backing file it names is missing (qemu-img info --backing-chain " + dk.Source + " shows the chain): restore that file, or point the image at it with qemu-img rebase -u"
		}
	}
	return ""
}

// linkTarget says whether path is a symbolic link, and where it leads (resolved when it
// can be, else as read).
func linkTarget(path string) (string, bool) {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		return "", false
	}
	if t, err := filepath.EvalSymlinks(path); err == nil {
		return t, true
	}
	t, _ := os.Readlink(path)
	return t, true
}

// otherDomains returns the definitions of the persistent domains other than selfUUID,
// each read once: a caller checks all its files against them with usedBy. A domain whose
// definition cannot be read or parsed is an error (the caller keeps its files).
func (m *Manager) otherDomains(ctx context.Context, selfUUID string) ([]*domxml.Domain, error) {
	uuids, err := m.cfg.Libvirt.Domains(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing libvirt's domains: %w", err)
	}
	var out []*domxml.Domain
	for _, u := range uuids {
		if u == selfUUID {
			continue
		}
		x, err := m.cfg.Libvirt.DomainXML(ctx, u)
		if errors.Is(err, ErrNoDomain) {
			continue // undefined meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("reading domain %s: %w", u, err)
		}
		o, err := domxml.Parse(x)
		if err != nil {
			return nil, fmt.Errorf("domain %s: %w", u, err)
		}
		out = append(out, o)
	}
	return out, nil
}

// usedBy returns the name of the first domain of ds whose disks name path (as a source
// or first backing file), "" if none does.
func usedBy(ds []*domxml.Domain, path string) string {
	for _, o := range ds {
		if referenced(o, path) {
			return o.Name
		}
	}
	return ""
}

// Finalize removes the original disk files that protect, rekey --deep and unprotect
// kept, except a file the domain's definition (or another domain's) names again and a
// file some process has open (a VM resumed from a save image or snapshot older than the
// change runs on it); such a file stays listed, and a later Finalize removes it. It is
// idempotent; the VM may run.
func (m *Manager) Finalize(ctx context.Context, domain string) (vmapi.VM, error) {
	m.lock("finalize of "+domain, nil)
	defer m.unlock()
	_, d, err := m.lookup(ctx, domain)
	if errors.Is(err, ErrNoDomain) {
		// Undefined since: its kept files are found by UUID or by the name it had.
		u, uerr := m.undefinedKept(ctx, domain)
		if uerr != nil {
			return vmapi.VM{}, uerr
		}
		if u != "" {
			return m.finalizeUndefined(ctx, u)
		}
	}
	if err != nil {
		return vmapi.VM{}, err
	}
	if _, err := os.Stat(m.j.path(d.UUID)); err == nil {
		if err := m.recoverOneLocked(ctx, d.UUID); err != nil {
			return vmapi.VM{}, fmt.Errorf("vm %q: %w: %w; fix the cause and run the command again", d.Name, ErrPending, err)
		}
		if _, d, err = m.lookup(ctx, domain); err != nil {
			return vmapi.VM{}, err
		}
	}
	removed, left, problems, err := m.removeKept(ctx, d.UUID, d.Name, d)
	if err != nil {
		return vmapi.VM{}, err
	}
	v, err := m.Status(ctx, d.UUID)
	finalizeNote(&v, removed, left, problems)
	return v, err
}

// finalizeUndefined is Finalize of VM vmUUID, which libvirt no longer defines: its kept
// files are removed unless another domain names them or a process has them open.
func (m *Manager) finalizeUndefined(ctx context.Context, vmUUID string) (vmapi.VM, error) {
	if m.j.exists(vmUUID) {
		return vmapi.VM{}, fmt.Errorf("vm %s: %w: an interrupted operation on it is not finished, and libvirt no longer defines it: define it again (virsh define), then run nkpctl vm protect --finalize %s", vmUUID, ErrPending, vmUUID)
	}
	removed, left, problems, err := m.removeKept(ctx, vmUUID, vmUUID, nil)
	if err != nil {
		return vmapi.VM{}, err
	}
	v, ok := m.orphanVM(vmUUID)
	if !ok {
		v = vmapi.VM{Domain: vmUUID, UUID: vmUUID}
	}
	finalizeNote(&v, removed, left, problems)
	return v, nil
}

// undefinedKept returns the UUID of a VM libvirt no longer defines whose kept files
// hostd lists, named by domain: its UUID, or the name it had when they were kept; "" if
// there is none.
func (m *Manager) undefinedKept(ctx context.Context, domain string) (string, error) {
	if kdk.CheckUUID(domain) == nil {
		u := strings.ToLower(domain)
		if ks, err := m.readKept(u); err != nil {
			return "", fmt.Errorf("vm %s: %w", u, err)
		} else if len(ks) > 0 {
			return u, nil
		}
		return "", nil
	}
	var found []string
	for _, u := range m.keptUUIDs() {
		ks, err := m.readKept(u)
		if err != nil || !slices.ContainsFunc(ks, func(k kept) bool { return k.VM == domain }) {
			continue
		}
		if _, _, err := m.lookup(ctx, u); !errors.Is(err, ErrNoDomain) {
			continue // still defined (under another name now)
		}
		found = append(found, u)
	}
	switch len(found) {
	case 0:
		return "", nil
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("vm %q: libvirt defines no such domain, and hostd keeps original disk files of %d undefined VMs that had that name (%s): run nkpctl vm protect --finalize with one of these UUIDs", domain, len(found), strings.Join(found, ", "))
}

// keptUUIDs lists the VMs whose kept files hostd lists (JournalDir/<uuid>.kept).
func (m *Manager) keptUUIDs() []string { return m.j.uuidsWith(".kept") }

// keptProblem is the status problem of the kept files ks of VM vmUUID, which libvirt no
// longer defines.
func keptProblem(vmUUID string, ks []kept) string {
	var paths []string
	name, plain := "", false
	for _, k := range ks {
		paths = append(paths, k.Path)
		if k.VM != "" {
			name = k.VM
		}
		plain = plain || k.Op == opProtect
	}
	what := "the files its disks were converted from"
	if plain {
		what = "the files its disks were converted from, the ones protect encrypted still holding the guest's data unencrypted"
	}
	vm := vmUUID
	if name != "" {
		vm = fmt.Sprintf("%s (%s)", name, vmUUID)
	}
	return fmt.Sprintf("VM %s is no longer defined in libvirt, but nkp keeps %s: %s; once nothing needs them, remove them with nkpctl vm protect --finalize %s (it keeps a file another domain names or a process has open)", vm, what, strings.Join(paths, ", "), vmUUID)
}

func finalizeNote(v *vmapi.VM, removed []string, left []kept, problems []string) {
	v.Problems = append(v.Problems, problems...)
	switch {
	case len(removed) == 0 && len(left) > 0:
		v.Note = "no kept original disk file could be removed yet (see the problems)"
	case len(removed) == 0:
		v.Note = "no kept original disk files to remove"
	default:
		v.Note = "removed the original disk files " + strings.Join(removed, ", ")
	}
}

// removeKept removes VM vmUUID's kept files that no domain (d: its own definition, nil
// when libvirt no longer defines it) names and no process has open, and lists the rest
// again; name is how the sentences call the VM.
func (m *Manager) removeKept(ctx context.Context, vmUUID, name string, d *domxml.Domain) (removed []string, left []kept, problems []string, err error) {
	ks, err := m.readKept(vmUUID)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("vm %q: %w", name, err)
	}
	// Other domains' definitions, read once for all of ks.
	var others []*domxml.Domain
	var othersErr error
	if len(ks) > 0 {
		others, othersErr = m.otherDomains(ctx, vmUUID)
	}
	for _, k := range ks {
		if d != nil && referenced(d, k.Path) {
			problems = append(problems, fmt.Sprintf("%s is kept: the domain's disk %s uses it again", k.Path, k.Target))
			continue
		}
		if othersErr != nil {
			left = append(left, k)
			problems = append(problems, fmt.Sprintf("%s is kept: cannot tell whether another domain uses it (%v); run nkpctl vm protect --finalize %s again", k.Path, othersErr, name))
			continue
		} else if other := usedBy(others, k.Path); other != "" {
			left = append(left, k)
			problems = append(problems, fmt.Sprintf("%s is kept: domain %s names it too and still uses this unencrypted original; protect that domain (or point it at another file with virsh edit), then run nkpctl vm protect --finalize %s again", k.Path, other, name))
			continue
		}
		if target, ok := linkTarget(k.Path); ok {
			// Removing the link would leave the plaintext where it is, behind a
			// "removed" note: say where it is instead, and keep listing it.
			left = append(left, k)
			problems = append(problems, fmt.Sprintf("%s is kept: it is a symbolic link to %s, which holds the unencrypted data; nkp removes only the file a domain names, not what a link points to: remove %s and the link yourself once nothing uses them", k.Path, target, target))
			continue
		}
		if ps, err := openers(m.procDir(), k.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			left = append(left, k)
			problems = append(problems, fmt.Sprintf("%s is kept: cannot tell whether a process has it open (%v); run nkpctl vm protect --finalize %s again", k.Path, err, name))
			continue
		} else if len(ps) > 0 {
			left = append(left, k)
			problems = append(problems, fmt.Sprintf("%s is kept: %s has it open (a VM resumed from a save image or snapshot made before nkp changed disk %s runs on it, and would lose what it writes): shut that VM down, keep its data, then run nkpctl vm protect --finalize %s again", k.Path, ps[0], k.Target, name))
			continue
		}
		if err := os.Remove(k.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			left = append(left, k)
			problems = append(problems, fmt.Sprintf("removing %s: %v", k.Path, err))
			continue
		}
		atomicfile.SyncDir(filepath.Dir(k.Path))
		removed = append(removed, k.Path)
	}
	if err := m.writeKept(vmUUID, left); err != nil {
		return nil, nil, nil, fmt.Errorf("vm %q: %w", name, err)
	}
	m.log.Info("vm: kept originals removed", "vm", name, "uuid", vmUUID, "files", removed)
	return removed, left, problems, nil
}

// diskObjects returns the objects of des (before or after).
func diskObjects(des []diskEntry, after bool) []domxml.Object {
	var out []domxml.Object
	for _, de := range des {
		o := de.Old
		if after {
			o = de.Obj
		}
		if o.KeyID != "" {
			out = append(out, o)
		}
	}
	return out
}
