package hostd

import "sync"

// vmLocks serialises the work on one VM (its hooks, reconciliation after an event): one
// mutex per VM UUID, kept only while someone holds or waits for it, so the map does not
// grow with every VM ever seen by a long-running hostd.
type vmLocks struct {
	mu sync.Mutex
	m  map[string]*vmLock // guarded by mu
}

type vmLock struct {
	sync.Mutex
	refs int // holders and waiters; guarded by vmLocks.mu
}

// lock takes uuid's lock and returns its unlock, which frees the entry when no one else
// holds or waits for it.
func (l *vmLocks) lock(uuid string) (unlock func()) {
	l.mu.Lock()
	if l.m == nil {
		l.m = map[string]*vmLock{}
	}
	e := l.m[uuid]
	if e == nil {
		e = &vmLock{}
		l.m[uuid] = e
	}
	e.refs++
	l.mu.Unlock()
	e.Lock()
	return func() {
		e.Unlock()
		l.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(l.m, uuid)
		}
		l.mu.Unlock()
	}
}

// len is the number of entries (tests).
func (l *vmLocks) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
}
