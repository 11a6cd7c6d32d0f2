package disksecret

import (
	"context"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/hostd/domxml"
)

// verifyKey identifies one verdict: the image as it was (path, device, inode, size,
// modification and change times: another file renamed or copied over it, or its content
// changed, gives another key) and the secret (a secret's value follows from its UUID: the
// key ID and VM are in it).
type verifyKey struct {
	path         string
	dev, ino     uint64
	size         int64
	mtime, ctime time.Time
	secret       string
}

// verifyCache remembers verdicts so that a reconcile or a redefinition does not run
// qemu-img again for an image that did not change: the newest verdict per image path and
// secret, with the identity of the file it was given on.
type verifyCache struct {
	mu sync.Mutex
	m  map[imageUnder]verdict // guarded by mu
}

// imageUnder is an image path and the secret it is verified under.
type imageUnder struct{ path, secret string }

type verdict struct {
	k     verifyKey // the file as it was verified
	opens bool      // true: opens; false: does not (wrong key)
}

// get returns the verdict on the image file k names, as it is now (ok false: none).
func (c *verifyCache) get(k verifyKey) (opens, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[imageUnder{k.path, k.secret}]
	if !ok || v.k != k {
		return false, false
	}
	return v.opens, true
}

// judged reports whether the cache holds a verdict on the image at path under secret
// (for another identity of the file than k's, when get(k) found none).
func (c *verifyCache) judged(path, secret string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.m[imageUnder{path, secret}]
	return ok
}

func (c *verifyCache) put(k verifyKey, opens bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[imageUnder]verdict{}
	}
	c.m[imageUnder{k.path, k.secret}] = verdict{k: k, opens: opens}
}

// imageKey stats w's image; ok is false when there is nothing to verify (no verifier, no
// path, no file yet).
func (m *Manager) imageKey(w want, secret string) (verifyKey, bool) {
	if m.cfg.Verify == nil || w.path == "" {
		return verifyKey{}, false
	}
	return statKey(w.path, secret)
}

// statKey is the identity of the image at path (one stat), for secret.
func statKey(path, secret string) (verifyKey, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return verifyKey{}, false
	}
	return verifyKey{path: path, dev: uint64(st.Dev), ino: st.Ino, size: st.Size,
		mtime: time.Unix(st.Mtim.Unix()), ctime: time.Unix(st.Ctim.Unix()), secret: secret}, true
}

// CheckImages is the hook's check of the images of VM vmUUID's disks (image gives the
// path and format of the image of the disk of target dev whose <encryption> names
// secretUUID in the hook's domain XML, "" when it has none): one
// stat per disk, compared with the identity of the file last verified under the disk's
// key (memory only while nothing changed). When the file differs from the one verified
// (another image copied or renamed over it, its content changed), the image is verified
// again at once, inline (the key derived from the KDK cache, the image's LUKS header
// unlocked by Verify, i.e. one qemu-img run; never libvirt), so that a swapped
// image is refused by the hook with its path instead of failing in QEMU with "Invalid
// password". An image never verified yet is left to the background verification, and
// one that cannot be judged (locked, unreadable) to QEMU. It returns the first disk whose
// image does not open under its key (Reason WrongKey), and updates what Check answers.
func (m *Manager) CheckImages(ctx context.Context, vmUUID, vmName string, disks []domxml.Object, image func(target, secretUUID string) (path, format string)) *NotReady {
	if m.cfg.Verify == nil {
		return nil
	}
	for _, o := range disks {
		u := domxml.SecretUUID(vmUUID, o.KeyID)
		path, format := image(target(o), u)
		if path == "" {
			continue
		}
		k, ok := statKey(path, u)
		if !ok {
			continue // QEMU says what is wrong with a missing file
		}
		opens, known := m.vcache.get(k)
		if !known {
			if !m.vcache.judged(path, u) {
				continue // never verified: the background verification does it
			}
			wrong, ok := m.verify(ctx, want{vmUUID: vmUUID, vmName: vmName, obj: o, path: path, format: format}, u)
			if !ok {
				continue
			}
			opens = wrong == ""
			m.log.Info("a protected disk's image changed since it was verified: verified again", "uuid", vmUUID, "vm", vmName, "disk", target(o), "key_id", o.KeyID, "path", path, "opens", opens)
		}
		m.mu.Lock()
		if e, ok := m.entries[u]; ok && e.obj == o && e.path == path {
			e.wrongKey = ""
			if !opens {
				e.wrongKey = path
			}
		}
		m.mu.Unlock()
		if !opens {
			return &NotReady{Object: o, Target: target(o), Reason: WrongKey, Path: path}
		}
	}
	return nil
}

// verdict returns what the cache knows of w's image under secret: the image's path when
// it does not open under the key, "" when it does; known is false when the image is to
// be verified (queueVerify), and true (with "") when there is nothing to verify.
func (m *Manager) verdict(w want, secret string) (wrong string, known bool) {
	k, ok := m.imageKey(w, secret)
	if !ok {
		return "", true
	}
	opens, ok := m.vcache.get(k)
	switch {
	case !ok:
		return "", false
	case opens:
		return "", true
	}
	return w.path, true
}

func (m *Manager) queueVerify(secret string, w want) {
	m.vmu.Lock()
	m.vjobs[secret] = w
	m.vmu.Unlock()
	select {
	case m.vwake <- struct{}{}:
	default:
	}
}

// verifyQueued verifies the queued images: the key is derived again (nothing holds a
// passphrase while it waits), the image opened under it, the verdict cached and noted
// on the entry if it still stands for that image.
func (m *Manager) verifyQueued(ctx context.Context) {
	m.vmu.Lock()
	jobs := m.vjobs
	m.vjobs = map[string]want{}
	m.vmu.Unlock()
	for _, u := range sortedKeys(jobs) {
		w := jobs[u]
		wrong, ok := m.verdict(w, u) // an image already judged as it is now: no qemu-img
		if !ok {
			wrong, ok = m.verify(ctx, w, u)
		}
		if !ok {
			continue
		}
		m.mu.Lock()
		if e, ok := m.entries[u]; ok && e.obj == w.obj && e.path == w.path {
			e.wrongKey = wrong
		}
		m.mu.Unlock()
	}
}

// Reverify queues the verification of VM vmUUID's disk images in the background (the
// release hook: QEMU wrote to them, so their identity changed, and the next start would
// otherwise verify them inline). Memory only; it never blocks.
func (m *Manager) Reverify(vmUUID string) {
	if m.cfg.Verify == nil {
		return
	}
	m.mu.RLock()
	var ws []want
	for _, e := range m.entries {
		if e.vmUUID == vmUUID && e.path != "" && e.state == stateDefined {
			ws = append(ws, want{vmUUID: e.vmUUID, vmName: e.vmName, obj: e.obj, path: e.path, format: e.format})
		}
	}
	m.mu.RUnlock()
	for _, w := range ws {
		m.queueVerify(domxml.SecretUUID(w.vmUUID, w.obj.KeyID), w)
	}
}

// verify opens w's image under its key; ok is false when nobody can tell (no image,
// the key not derivable, qemu-img failing otherwise: QEMU's own error then speaks).
func (m *Manager) verify(ctx context.Context, w want, secret string) (wrong string, ok bool) {
	k, ok := m.imageKey(w, secret)
	if !ok {
		return "", false
	}
	key, err := m.cfg.Keys.DiskKey(ctx, w.vmUUID, w.obj)
	if err != nil {
		return "", false
	}
	pass := make([]byte, hex.EncodedLen(len(key)))
	hex.Encode(pass, key)
	clear(key)
	defer clear(pass)
	vctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err = m.cfg.Verify.Opens(vctx, w.path, w.format, pass)
	switch {
	case err == nil:
		m.vcache.put(k, true)
		m.log.Debug("disk image opens under its key", "uuid", w.vmUUID, "disk", target(w.obj), "key_id", w.obj.KeyID, "path", w.path)
		return "", true
	case errors.Is(err, ErrWrongKey):
		m.vcache.put(k, false)
		m.log.Warn("a protected disk's image does not open under its key: its starts are refused", "uuid", w.vmUUID, "vm", w.vmName, "disk", target(w.obj), "key_id", w.obj.KeyID, "path", w.path)
		return w.path, true
	}
	m.log.Debug("disk image not verified", "path", w.path, "err", err)
	return "", false
}
