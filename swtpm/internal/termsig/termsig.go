// Package termsig turns SIGTERM, SIGINT and SIGHUP into the end of a context, as
// os/signal.NotifyContext does, without the two OS threads os/signal keeps for the
// life of the process: its signal loop blocks one thread in the runtime
// (signal_recv), and the first Notify starts a goroutine locked to another (the
// runtime's ensureSigM). For nkp-swtpm, an idle process whose Go side otherwise only
// waits in the network poller, those two threads were two of its seven, each with its
// stack, signal stack and C allocator arena. Only cmd/nkp-swtpm links it (through
// swtpm/cli).
//
// A C handler (SA_ONSTACK, async-signal-safe: one write(2)) replaces the Go runtime's
// handler for the three signals and writes the signal's number into a non-blocking
// pipe; a goroutine reads the pipe through the network poller and cancels the
// context. Stop puts the previous handlers back and closes Go's end of the pipe. Signals that
// arrive before NotifyContext is called end the process as before (the runtime's
// default), and nothing else may call os/signal.Notify for these signals while the
// context is in use: Notify would install the runtime's handler again.
package termsig

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
)

// Signals are the signals that end the context.
var Signals = []syscall.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP}

// mu serialises NotifyContext and stop: the C side has one set of handlers.
var mu sync.Mutex

// ErrInUse is returned by NotifyContext while an earlier context's stop has not run.
var ErrInUse = errors.New("termsig: the signal handlers are already installed (stop the earlier context first)")

// NotifyContext returns a copy of parent that is cancelled when SIGTERM, SIGINT or
// SIGHUP arrives (its cause then names the signal), and a stop function that puts the
// previous handlers back, releases the pipe and cancels the context. Call stop once
// the signals should no longer be caught, as with os/signal.NotifyContext.
func NotifyContext(parent context.Context) (context.Context, context.CancelFunc, error) {
	mu.Lock()
	rfd, err := install()
	if err != nil {
		mu.Unlock()
		return nil, nil, err
	}
	mu.Unlock()
	r := os.NewFile(uintptr(rfd), "termsig pipe")
	ctx, cancel := context.WithCancelCause(parent)
	done := make(chan struct{})
	go func() {
		defer close(done)
		var b [1]byte
		for {
			n, err := r.Read(b[:])
			if n == 1 {
				cancel(fmt.Errorf("signal %v", syscall.Signal(b[0])))
				return
			}
			if err != nil {
				return // stop closed the pipe
			}
		}
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			mu.Lock()
			uninstall()
			mu.Unlock()
			r.Close()
			<-done
			cancel(context.Canceled)
		})
	}
	return ctx, stop, nil
}
