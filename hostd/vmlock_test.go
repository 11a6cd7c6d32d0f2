package hostd

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// TestVMLocks: one holder per VM at a time, VMs independent, and no entry left once no
// one holds or waits (the map grew by one mutex per VM ever seen before).
func TestVMLocks(t *testing.T) {
	var l vmLocks
	const vms, workers, rounds = 20, 8, 50
	inside := make([]atomic.Int32, vms)
	var wg sync.WaitGroup
	var bad atomic.Int32
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				i := (w + r) % vms
				unlock := l.lock(fmt.Sprintf("vm-%d", i))
				if inside[i].Add(1) != 1 {
					bad.Add(1)
				}
				inside[i].Add(-1)
				unlock()
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Errorf("%d times two holders of one VM's lock at once", bad.Load())
	}
	if n := l.len(); n != 0 {
		t.Errorf("%d lock entries left after every holder unlocked, want 0", n)
	}
	// A waiter keeps the entry alive: the holder's unlock must not free it under it.
	unlock := l.lock("vm-x")
	got := make(chan func())
	go func() { got <- l.lock("vm-x") }()
	for l.refs("vm-x") != 2 {
		runtime.Gosched()
	}
	unlock()
	second := <-got
	if n := l.len(); n != 1 {
		t.Errorf("entries while the second holder holds: %d, want 1", n)
	}
	second()
	if n := l.len(); n != 0 {
		t.Errorf("entries after both unlocked: %d, want 0", n)
	}
}

func (l *vmLocks) refs(uuid string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.m[uuid]; e != nil {
		return e.refs
	}
	return 0
}
