package txbuf

import (
	"context"
	"fmt"
	"sync"

	"github.com/nkp-dev/nkp/provider/store"
)

// Gate admits transactions until the store closes: transactions hold it for reading,
// Close for writing, so Close waits for the transactions that are running.
type Gate struct {
	mu     sync.RWMutex
	closed bool // guarded by mu
}

// Enter admits one transaction of the store named where (op: "view", "update"). It fails
// when ctx is done or the store is closed; the returned func lets the transaction out.
func (g *Gate) Enter(ctx context.Context, where, op string) (func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %s: %w", where, op, err)
	}
	g.mu.RLock()
	if g.closed {
		g.mu.RUnlock()
		return nil, fmt.Errorf("%s: %s: %w", where, op, store.ErrClosed)
	}
	return g.mu.RUnlock, nil
}

// Close waits for running transactions, closes the gate and runs release once; later
// calls return nil.
func (g *Gate) Close(release func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	return release()
}
