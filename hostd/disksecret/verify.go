package disksecret

import (
	"context"
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

// verify checks that w's image opens under pass; it returns the image's path when it is
// known not to, "" when it opens or nobody can tell (no verifier, no path, the image in
// use by a running QEMU, qemu-img failing otherwise: QEMU's own error then speaks).
func (m *Manager) verify(ctx context.Context, w want, secret string, pass []byte) string {
	if m.cfg.Verify == nil || w.path == "" {
		return ""
	}
	fi, err := os.Stat(w.path)
	if err != nil {
		m.log.Debug("disk image not verified", "path", w.path, "err", err)
		return ""
	}
	k := verifyKey{path: w.path, size: fi.Size(), mtime: fi.ModTime(), secret: secret}
	if opens, ok := m.vcache.get(k); ok {
		if opens {
			return ""
		}
		return w.path
	}
	vctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err = m.cfg.Verify.Opens(vctx, w.path, w.format, pass)
	switch {
	case err == nil:
		m.vcache.put(k, true)
		return ""
	case errors.Is(err, ErrWrongKey):
		m.vcache.put(k, false)
		m.log.Warn("a protected disk's image does not open under its key: its starts are refused", "uuid", w.vmUUID, "vm", w.vmName, "disk", target(w.obj), "key_id", w.obj.KeyID, "path", w.path)
		return w.path
	}
	m.log.Debug("disk image not verified", "path", w.path, "err", err)
	return ""
}
