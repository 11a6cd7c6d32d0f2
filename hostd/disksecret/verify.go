package disksecret

import (
	"context"
	"encoding/hex"
	"errors"
	"os"
	"sync"
	"time"
)

// verifyKey identifies one verdict: the image as it was (path, size, modification time)
// and the secret (a secret's value follows from its UUID: the key ID and VM are in it).
type verifyKey struct {
	path   string
	size   int64
	mtime  time.Time
	secret string
}

// verifyCache remembers verdicts so that a reconcile or a redefinition does not run
// qemu-img again for an image that did not change.
type verifyCache struct {
	mu sync.Mutex
	m  map[verifyKey]bool // true: opens; false: does not (wrong key); guarded by mu
}

func (c *verifyCache) get(k verifyKey) (opens, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	opens, ok = c.m[k]
	return opens, ok
}

func (c *verifyCache) put(k verifyKey, opens bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[verifyKey]bool{}
	}
	for old := range c.m { // one verdict per image and secret: the newest
		if old.path == k.path && old.secret == k.secret {
			delete(c.m, old)
		}
	}
	c.m[k] = opens
}

// imageKey stats w's image; ok is false when there is nothing to verify (no verifier, no
// path, no file yet).
func (m *Manager) imageKey(w want, secret string) (verifyKey, bool) {
	if m.cfg.Verify == nil || w.path == "" {
		return verifyKey{}, false
	}
	fi, err := os.Stat(w.path)
	if err != nil {
		return verifyKey{}, false
	}
	return verifyKey{path: w.path, size: fi.Size(), mtime: fi.ModTime(), secret: secret}, true
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
		wrong, ok := m.verify(ctx, w, u)
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
		return "", true
	case errors.Is(err, ErrWrongKey):
		m.vcache.put(k, false)
		m.log.Warn("a protected disk's image does not open under its key: its starts are refused", "uuid", w.vmUUID, "vm", w.vmName, "disk", target(w.obj), "key_id", w.obj.KeyID, "path", w.path)
		return w.path, true
	}
	m.log.Debug("disk image not verified", "path", w.path, "err", err)
	return "", false
}
