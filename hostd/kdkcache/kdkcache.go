// Package kdkcache keeps a joined host's KDK versions.
//
// With a host TPM, each version is on disk only as the provider's TPM import blob
// (DIR/v<N>.json, 0600, in a 0700 directory: id, version, primary flag, blob), which
// only this host's TPM unwraps; Open unwraps every cached blob, so hostd starts VMs while
// the provider is unreachable. Without a TPM (the provider released the KDK bare), the
// versions live in memory only and nothing is written: a restart needs the provider.
// Unwrapped KDKs are held in memory for the daemon's life and wiped by Remove, Forget and
// Close; Key hands out copies that the caller wipes; Update wipes the bare keys of the
// release it is given.
//
// Update applies a provider release: new versions are stored and unwrapped, versions the
// provider no longer releases (retired) are deleted, the primary flag follows. Forget
// (the host was revoked) deletes everything.
//
// Importers: hostd. No cgo.
package kdkcache

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// Errors.
var (
	ErrUnknownVersion = errors.New("KDK version unknown to this host")
	ErrUnusable       = errors.New("KDK version cached but not usable")
	ErrNoTPM          = errors.New("the provider released an import blob but this host has no TPM")
	ErrNeedTPM        = errors.New("the provider released a bare KDK to a host with a TPM")
)

// Unwrapper is the host TPM as the cache uses it (hosttpm.TPM).
type Unwrapper interface {
	Unwrap(blob []byte) ([]byte, error)
}

// Version describes one cached KDK version.
type Version struct {
	ID      string `json:"id"`
	Version int    `json:"version"`
	Primary bool   `json:"primary"`
	// Err is why the version cannot be used (the TPM refused its blob); "" when usable.
	Err string `json:"error,omitempty"`
}

type entry struct {
	Version
	blob []byte // import blob (TPM mode)
	key  []byte // unwrapped KDK; nil when Err != ""
}

type record struct {
	ID         string `json:"id"`
	Version    int    `json:"version"`
	Primary    bool   `json:"primary"`
	ImportBlob []byte `json:"import_blob"`
}

// Cache holds the KDK versions. Safe for concurrent use.
type Cache struct {
	dir string
	tpm Unwrapper // nil: memory only
	log *slog.Logger

	mu      sync.RWMutex
	entries map[int]*entry // guarded by mu
}

// Open loads and unwraps the cached blobs in dir (TPM mode), or returns an empty
// memory-only cache when tpm is nil. A blob the TPM refuses is kept (Version.Err says
// why) so that status shows it and the next release replaces it.
func Open(dir string, tpm Unwrapper, log *slog.Logger) (*Cache, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cache{dir: dir, tpm: tpm, log: log, entries: map[int]*entry{}}
	if tpm == nil {
		return c, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("KDK cache: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("KDK cache: %w", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("KDK cache: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if atomicfile.IsTemp(name) {
			os.Remove(filepath.Join(dir, name)) // a write cut short by a crash
			continue
		}
		if !strings.HasPrefix(name, "v") || !strings.HasSuffix(name, ".json") {
			continue
		}
		path := filepath.Join(dir, name)
		raw, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("KDK cache %s: %w", path, err)
		}
		var r record
		if err := json.Unmarshal(raw, &r); err != nil || r.Version < 1 || name != fileName(r.Version) || kdk.CheckUUID(r.ID) != nil {
			log.Warn("KDK cache: unreadable file ignored (the next release from the provider replaces it)", "path", path, "err", err)
			continue
		}
		c.entries[r.Version] = c.unwrap(r)
	}
	return c, nil
}

func fileName(version int) string { return "v" + strconv.Itoa(version) + ".json" }

func (c *Cache) unwrap(r record) *entry {
	e := &entry{Version: Version{ID: r.ID, Version: r.Version, Primary: r.Primary}, blob: r.ImportBlob}
	key, err := c.tpm.Unwrap(r.ImportBlob)
	switch {
	case err != nil:
		e.Err = err.Error()
		c.log.Error("KDK version cannot be unwrapped by this host's TPM", "kdk_version", r.Version, "kdk_id", r.ID, "err", err)
	case len(key) != kdk.Size:
		clear(key)
		e.Err = fmt.Sprintf("unwrapped KDK is %d bytes, want %d", len(key), kdk.Size)
	default:
		e.key = key
	}
	return e
}

// Changes is what an Update did.
type Changes struct {
	Added, Removed []int
	Primary        int
}

// Update applies a release from the provider (see the package comment). It wipes the
// bare keys in rel (a memory-only host's KDKs) on every path, kept or refused, so that a
// periodic sync leaves no copy of them in the caller's garbage.
func (c *Cache) Update(rel apiv1.ReleaseResponse) (Changes, error) {
	defer func() {
		for i := range rel.KDKs {
			clear(rel.KDKs[i].Bare)
		}
	}()
	c.mu.Lock()
	defer c.mu.Unlock()
	var ch Changes
	seen := map[int]bool{}
	for _, k := range rel.KDKs {
		if k.Version < 1 || kdk.CheckUUID(k.ID) != nil {
			return ch, fmt.Errorf("KDK cache: the provider released a KDK with version %d and id %q", k.Version, k.ID)
		}
		seen[k.Version] = true
		if k.Primary {
			ch.Primary = k.Version
		}
		old := c.entries[k.Version]
		switch {
		case c.tpm == nil && len(k.Bare) == 0:
			return ch, fmt.Errorf("KDK version %d: %w", k.Version, ErrNoTPM)
		case c.tpm != nil && len(k.ImportBlob) == 0:
			return ch, fmt.Errorf("KDK version %d: %w (was the host joined without its EK?)", k.Version, ErrNeedTPM)
		}
		if old != nil && old.ID == k.ID && old.Err == "" {
			if old.Primary != k.Primary {
				old.Primary = k.Primary
				if c.tpm != nil {
					if err := c.write(record{ID: k.ID, Version: k.Version, Primary: k.Primary, ImportBlob: old.blob}); err != nil {
						return ch, err
					}
				}
			}
			continue
		}
		var e *entry
		if c.tpm == nil {
			if len(k.Bare) != kdk.Size {
				return ch, fmt.Errorf("KDK version %d: bare key of %d bytes, want %d", k.Version, len(k.Bare), kdk.Size)
			}
			e = &entry{Version: Version{ID: k.ID, Version: k.Version, Primary: k.Primary}, key: slices.Clone(k.Bare)}
		} else {
			r := record{ID: k.ID, Version: k.Version, Primary: k.Primary, ImportBlob: k.ImportBlob}
			e = c.unwrap(r)
			if e.Err != "" {
				return ch, fmt.Errorf("KDK version %d (%s): %s: the provider wrapped it for another TPM than this host's; re-join the host if its TPM was replaced", k.Version, k.ID, e.Err)
			}
			if err := c.write(r); err != nil {
				clear(e.key)
				return ch, err
			}
		}
		if old != nil {
			clear(old.key)
		}
		c.entries[k.Version] = e
		ch.Added = append(ch.Added, k.Version)
	}
	for v, e := range c.entries {
		if !seen[v] {
			if err := c.removeLocked(v, e); err != nil {
				return ch, err
			}
			ch.Removed = append(ch.Removed, v)
		}
	}
	slices.Sort(ch.Added)
	slices.Sort(ch.Removed)
	return ch, nil
}

func (c *Cache) removeLocked(v int, e *entry) error {
	clear(e.key)
	delete(c.entries, v)
	if c.tpm == nil {
		return nil
	}
	if err := os.Remove(filepath.Join(c.dir, fileName(v))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("KDK cache: %w", err)
	}
	return atomicfile.SyncDir(c.dir)
}

func (c *Cache) write(r record) error {
	raw, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(c.dir, fileName(r.Version)), raw, 0o600); err != nil {
		return fmt.Errorf("KDK cache: storing version %d: %w", r.Version, err)
	}
	return nil
}

// Key returns a copy of KDK version v (the caller wipes it) and its ID.
func (c *Cache) Key(v int) ([]byte, string, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.entries[v]
	if !ok {
		return nil, "", fmt.Errorf("KDK version %d: %w", v, ErrUnknownVersion)
	}
	if e.Err != "" {
		return nil, e.ID, fmt.Errorf("KDK version %d (%s): %w: %s", v, e.ID, ErrUnusable, e.Err)
	}
	return slices.Clone(e.key), e.ID, nil
}

// Versions lists the cached versions, oldest first.
func (c *Cache) Versions() []Version {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]Version, 0, len(c.entries))
	for _, e := range c.entries {
		out = append(out, e.Version)
	}
	slices.SortFunc(out, func(a, b Version) int { return a.Version - b.Version })
	return out
}

// Primary returns the primary version, if the cache has one.
func (c *Cache) Primary() (Version, bool) {
	for _, v := range c.Versions() {
		if v.Primary {
			return v, true
		}
	}
	return Version{}, false
}

// Persistent reports whether the cache survives a restart (TPM mode).
func (c *Cache) Persistent() bool { return c.tpm != nil }

// Forget deletes every version, from memory and disk (the host was revoked).
func (c *Cache) Forget() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var first error
	for v, e := range c.entries {
		if err := c.removeLocked(v, e); err != nil && first == nil {
			first = err
		}
	}
	if c.tpm != nil { // also files Open could not read
		ents, _ := os.ReadDir(c.dir)
		for _, e := range ents {
			if err := os.Remove(filepath.Join(c.dir, e.Name())); err != nil && first == nil {
				first = fmt.Errorf("KDK cache: %w", err)
			}
		}
		if err := atomicfile.SyncDir(c.dir); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Close wipes the unwrapped keys from memory; the blobs stay on disk.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for v, e := range c.entries {
		clear(e.key)
		delete(c.entries, v)
	}
}
