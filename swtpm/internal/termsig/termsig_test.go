package termsig

import (
	"context"
	"errors"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNotifyContext sends each signal to the test process and expects the context to
// end with it as the cause; the handlers can be installed again after stop.
func TestNotifyContext(t *testing.T) {
	for _, sig := range Signals {
		t.Run(sig.String(), func(t *testing.T) {
			ctx, stop, err := NotifyContext(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			if err := syscall.Kill(syscall.Getpid(), sig); err != nil {
				t.Fatal(err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Second):
				t.Fatalf("context not done within 10 s of %v", sig)
			}
			if cause := context.Cause(ctx); cause == nil || !strings.Contains(cause.Error(), sig.String()) {
				t.Errorf("cause %v, want it to name %v", cause, sig)
			}
		})
	}
}

// TestStop: a second NotifyContext before stop is refused; stop cancels the context
// without a signal and puts the previous handler back (an ignored SIGHUP stays
// ignored: the process survives it).
func TestStop(t *testing.T) {
	signal.Ignore(syscall.SIGHUP)
	defer signal.Reset(syscall.SIGHUP)
	ctx, stop, err := NotifyContext(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := NotifyContext(context.Background()); !errors.Is(err, ErrInUse) {
		t.Errorf("second NotifyContext: %v, want ErrInUse", err)
	}
	stop()
	stop() // twice is fine
	if ctx.Err() == nil {
		t.Fatal("context not cancelled by stop")
	}
	if cause := context.Cause(ctx); !errors.Is(cause, context.Canceled) {
		t.Errorf("cause %v, want context.Canceled", cause)
	}
	// Delivered before kill returns (no thread blocks it): were Go's default handler
	// back instead of the ignore, the test process would end here.
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	ctx2, stop2, err := NotifyContext(context.Background())
	if err != nil {
		t.Fatalf("NotifyContext after stop: %v", err)
	}
	defer stop2()
	if ctx2.Err() != nil {
		t.Errorf("new context already done (%v): a signal of the earlier installation leaked into it", context.Cause(ctx2))
	}
}
