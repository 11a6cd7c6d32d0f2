package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/nkp-dev/nkp/swtpm"
	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/swtpm/internal/libtpms"
	"github.com/nkp-dev/nkp/swtpm/state"
)

// keySpec converts the parsed --key or --migration-key option to what package state
// reads the key with.
func keySpec(k *cmdline.KeyOptions) state.KeySpec {
	spec := state.KeySpec{FD: -1, Format: k.Format, Mode: k.Mode, Remove: k.Remove}
	switch {
	case k.File != "":
		spec.Source, spec.Path = state.KeyFile, k.File
	case k.FD >= 0:
		spec.Source, spec.FD = state.KeyFD, k.FD
	case k.PwdFile != "":
		spec.Source, spec.Path = state.PwdFile, k.PwdFile
	case k.PwdFD >= 0:
		spec.Source, spec.FD = state.PwdFD, k.PwdFD
	}
	if k.IsPassphrase() {
		spec.KDF = envelope.KDF(k.KDF)
	}
	return spec
}

// readKey reads the key an option names; nil options give a nil key.
func readKey(option string, k *cmdline.KeyOptions, log *slog.Logger) (*state.Key, error) {
	if k == nil {
		return nil, nil
	}
	key, err := state.ParseKey(keySpec(k), log)
	if err != nil {
		return nil, fmt.Errorf("--%s: %w", option, err)
	}
	return key, nil
}

// serveHooks are what serve calls at the two points of a start.
type serveHooks struct {
	// beforeServe runs once the sockets listen and the state directory is locked,
	// before a byte from a client is read (the seccomp filter goes in there).
	beforeServe func() error
	// serving runs when the server takes clients (swtpm.Config.Serving): after a
	// control client already waiting was answered, before the TPM starts at launch.
	// What it logs, and the "nkp-swtpm serving" line after it, stay off the path of
	// that first answer. May be nil.
	serving func()
	// ready runs once the server is ready (swtpm.Server.Ready): clients can connect
	// and a TPM that starts at launch started. An error stops the server.
	ready func() error
}

// serve reads the keys, opens the state directory, the TPM and the sockets, calls the
// hooks, and serves until ctx ends or the server stops. Everything it opened is closed
// and the keys are wiped before it returns.
func serve(ctx context.Context, o *cmdline.Options, log *slog.Logger, hooks serveHooks) (err error) {
	if o.Ctrl == nil && !o.Flags.NotNeedInit {
		// As swtpm: a data-only TPM is served, but nothing can INIT it.
		log.Warn("no --ctrl and no --flags not-need-init: no client can initialise this TPM, so every TPM command fails; add --flags not-need-init,startup-clear, or --ctrl")
	}
	if o.Flags.Startup == cmdline.StartupDeactivated {
		return errors.New("--flags startup-deactivated exists only for TPM 1.2; use startup-clear or startup-state")
	}
	trimAfter, err := idleTrim(os.Getenv)
	if err != nil {
		return err
	}
	stateKey, err := readKey("key", o.Key, log)
	if err != nil {
		return err
	}
	defer stateKey.Wipe()
	migKey, err := readKey("migration-key", o.MigrationKey, log)
	if err != nil {
		return err
	}
	defer migKey.Wipe()

	mode := o.State.Mode
	if o.State.ModeDefault {
		mode = 0
	}
	opts := state.Options{Key: stateKey, Mode: mode, Lock: o.State.Lock, Backup: o.State.Backup, AcceptRollback: o.State.AcceptRollback, Log: log}
	var store interface {
		libtpms.NVRAM
		swtpm.StorageLocker
		Close() error
	}
	openLinear := func(p string, o state.Options) (stateStore, error) { return state.OpenLinear(p, o) }
	if o.State.File != "" && o.Migration.Incoming {
		// Locked when the TPM first needs it, as the directory below.
		store = &lazyDir{ctx: ctx, dir: o.State.File, opts: opts, open: openLinear}
	} else if o.State.File != "" {
		lf, err := state.OpenLinear(o.State.File, opts)
		if err != nil {
			return fmt.Errorf("--tpmstate: %w", err)
		}
		store = lf
	} else if o.Migration.Incoming {
		// Opened (and locked) when the TPM first needs it: on shared storage the
		// source holds the lock until the migration hands over the state.
		if fi, err := os.Stat(o.State.Dir); err != nil || !fi.IsDir() {
			return fmt.Errorf("--tpmstate: state directory %s does not exist or is not a directory; create it first", o.State.Dir)
		}
		store = &lazyDir{ctx: ctx, dir: o.State.Dir, opts: opts}
	} else {
		dir, err := state.Open(o.State.Dir, opts)
		if err != nil {
			return fmt.Errorf("--tpmstate: %w", err)
		}
		store = dir
	}
	defer func() {
		if cerr := store.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("--tpmstate: close: %w", cerr)
		}
	}()
	tpm, err := libtpms.Open(store)
	if err != nil {
		return fmt.Errorf("open the TPM engine: %w", err)
	}
	defer tpm.Close()

	cfg := swtpm.Config{
		Engine:              tpm,
		Store:               store,
		Log:                 log,
		Terminate:           o.Terminate,
		NotNeedInit:         o.Flags.NotNeedInit,
		DisableAutoShutdown: o.Flags.DisableAutoShutdown,
		RejectLocality4:     o.Locality.RejectLocality4,
		AllowSetLocality:    o.Locality.AllowSetLocality,
		StateKey:            stateKey.Bytes(),
		MigrationKey:        migKey.Bytes(),
		ReleaseLockOutgoing: o.Migration.ReleaseLockOutgoing,
		IdleTrim:            trimAfter,
	}
	switch o.Flags.Startup {
	case cmdline.StartupClear:
		cfg.Startup = swtpm.StartupClear
	case cmdline.StartupState:
		cfg.Startup = swtpm.StartupState
	}
	if o.Ctrl != nil {
		ctrl, err := openChannel(o.Ctrl, "ctrl")
		if err != nil {
			return err
		}
		defer ctrl.Close()
		cfg.CtrlListener, cfg.CtrlConn, cfg.CtrlTerminate = ctrl.Listener, ctrl.Conn, o.Ctrl.Terminate
	}
	if cfg.StatusListener, err = statusListener(os.Getenv); err != nil {
		return err
	}
	if cfg.StatusListener != nil {
		defer cfg.StatusListener.Close()
	}
	if o.Server != nil {
		data, err := openChannel(o.Server, "server")
		if err != nil {
			return err
		}
		defer data.Close()
		cfg.DataListener, cfg.DataConn, cfg.Disconnect = data.Listener, data.Conn, o.Server.Disconnect
	}
	link := libtpms.Linked()
	cfg.Serving = func() {
		if hooks.serving != nil {
			hooks.serving()
		}
		log.Info("nkp-swtpm serving", "version", Version, "state", o.State.Dir+o.State.File, "encrypted", stateKey != nil, "pid", os.Getpid(),
			"libtpms", link.Libtpms, "openssl", link.OpenSSL, "static", link.Static)
	}
	srv, err := swtpm.New(cfg)
	if err != nil {
		return err
	}
	// The server reads from clients as soon as Serve starts.
	if err := hooks.beforeServe(); err != nil {
		return err
	}
	// Ready means clients can connect and, when the TPM starts at launch (--flags
	// not-need-init or startup-*), that it started: so that `-d` and a pid-file
	// watcher do not report a daemon whose state could not be loaded (a wrong key).
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var readyErr error
	readyDone := make(chan struct{})
	go func() {
		defer close(readyDone)
		select {
		case <-srv.Ready():
			if readyErr = hooks.ready(); readyErr != nil {
				cancel()
			}
		case <-srv.Done():
		}
	}()
	err = srv.Serve(ctx)
	<-readyDone
	if err != nil {
		return fmt.Errorf("vTPM: %w", err)
	}
	return readyErr
}

// printStates prints the state blobs of --tpmstate as swtpm --print-states does.
func printStates(o *cmdline.Options, w io.Writer) error {
	states := state.States
	if o.State.File != "" {
		states = state.LinearStates
	}
	infos, err := states(o.State.Dir + o.State.File)
	if err != nil {
		return fmt.Errorf("--print-states: %w", err)
	}
	entries := make([]StateEntry, len(infos))
	for i, in := range infos {
		entries[i] = StateEntry{Name: in.Name, Size: in.Size}
	}
	return PrintStates(w, entries)
}

// envIdleTrim sets the idle trim (swtpm.Config.IdleTrim): "off" or "0" turns it off,
// a duration (Go syntax: 500ms, 5s) sets the idle time; unset means
// swtpm.DefaultIdleTrim. nkp's, not swtpm's; carried across -d like the rest of the
// environment.
const envIdleTrim = "NKP_SWTPM_IDLE_TRIM"

// idleTrim returns the idle time of envIdleTrim.
func idleTrim(getenv func(string) string) (time.Duration, error) {
	v := getenv(envIdleTrim)
	switch v {
	case "":
		return swtpm.DefaultIdleTrim, nil
	case "off", "0":
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%s=%q: want a duration such as 2s, or off; unset it for the default (%v)", envIdleTrim, v, swtpm.DefaultIdleTrim)
	}
	return d, nil
}
