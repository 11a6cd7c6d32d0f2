// Package systemd holds the small helpers nkp's daemons use to cooperate with systemd:
// readiness and stopping notifications (sd_notify), the watchdog keep-alive loop and
// socket activation, all through github.com/coreos/go-systemd/v22. Without systemd
// (NOTIFY_SOCKET, WATCHDOG_USEC and LISTEN_FDS unset) every helper is a no-op or falls back
// to the plain behaviour, so the daemons run the same under a shell, in tests and in CI.
//
// The unit files that go with the daemons sit beside this file (nkp-provider.service).
// Importers: cmd/nkp-provider and cmd/nkp-hostd.
//
// Units: nkp-provider.service and nkp-hostd.service (Type=notify, WatchdogSec,
// hardening). TestUnitExposure keeps `systemd-analyze security --offline=yes` at or
// below each unit's ceiling (1.9 and 2.9; a bare Type=notify unit scores 9.2) and runs
// systemd-analyze verify on both.
package systemd

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Notify sends one sd_notify state line (daemon.SdNotifyReady, ...). It reports whether a
// service manager received it; without NOTIFY_SOCKET it returns (false, nil).
func Notify(state string) (bool, error) {
	sent, err := daemon.SdNotify(false, state)
	if err != nil {
		return false, fmt.Errorf("sd_notify %q: %w (check NOTIFY_SOCKET and the unit's NotifyAccess)", state, err)
	}
	return sent, nil
}

// Ready tells the service manager that start-up is complete (READY=1).
func Ready() error {
	_, err := Notify(daemon.SdNotifyReady)
	return err
}

// Stopping tells the service manager that a graceful shutdown has begun (STOPPING=1).
func Stopping() error {
	_, err := Notify(daemon.SdNotifyStopping)
	return err
}

// WatchdogInterval returns how often the daemon must send WATCHDOG=1: half the
// WATCHDOG_USEC the service manager set, or 0 when the watchdog is off for this process.
func WatchdogInterval() (time.Duration, error) {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0, fmt.Errorf("watchdog: %w (check WATCHDOG_USEC and WATCHDOG_PID)", err)
	}
	return d / 2, nil
}

// RunWatchdog sends WATCHDOG=1 every interval while healthy reports nil, until ctx ends.
// When healthy fails the keep-alive is withheld (and the failure logged) so that systemd
// restarts a daemon that is wedged rather than merely alive. interval <= 0 returns at once.
// healthy may be nil.
func RunWatchdog(ctx context.Context, log *slog.Logger, interval time.Duration, healthy func(context.Context) error) {
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if healthy != nil {
			hctx, cancel := context.WithTimeout(ctx, interval)
			err := healthy(hctx)
			cancel()
			if err != nil {
				log.Warn("watchdog keep-alive withheld: daemon unhealthy", "err", err)
				continue
			}
		}
		if _, err := Notify(daemon.SdNotifyWatchdog); err != nil {
			log.Warn("watchdog keep-alive not sent", "err", err)
		}
	}
}

// Listener returns the first socket systemd passed by socket activation (LISTEN_FDS), or,
// when none was passed, a new TCP listener on addr.
func Listener(addr string) (net.Listener, error) {
	ls, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w (check LISTEN_FDS and LISTEN_PID)", err)
	}
	for _, l := range ls {
		if l != nil {
			for _, extra := range ls {
				if extra != nil && extra != l {
					extra.Close()
				}
			}
			return l, nil
		}
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w (is the address in use or the port privileged?)", addr, err)
	}
	return l, nil
}
