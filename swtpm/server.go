// Package swtpm is nkp's vTPM 2.0 server: it speaks swtpm's control and data protocols
// (specs/swtpm-protocol.md) over unix and TCP sockets, so that QEMU's tpm-emulator
// backend, libvirt, swtpm_setup, swtpm_ioctl, swtpm_bios and tpm2-tss' swtpm TCTI take
// it for swtpm, and drives a TPM engine (libtpms, package swtpm/internal/libtpms) whose
// state lives in a state store (package swtpm/state).
//
// Build a Config (the CLI in swtpm/cli does it from swtpm's options), call New, then
// Serve until the context ends, a client sends SHUTDOWN, or a terminate condition hits.
// Serve sends TPM2_Shutdown before it stops the TPM, so the state is saved.
//
// The server follows swtpm's semantics: one control client at a time, one data client
// at a time, the same 4-byte error replies, auto-shutdown, sticky locality; without a
// control channel (swtpm without --ctrl) the TPM is served on the data channel alone. Unlike
// swtpm it frames the data channel by the command header and bounds every wait for the
// rest of a message, so a stalled peer cannot hang the TPM for other clients.
//
// It is imported by swtpm/cli and by tests; the package has no global state (libtpms
// has, which is why there is one Engine per process).
//
// # Contract with its callers
//
// The caller opens the sockets, the state and the engine; the server owns none of
// them, except that Serve closes the listeners and connections given in Config when
// it returns. swtpm/cli wires it as state.Open, libtpms.Open(dir), the sockets of
// --ctrl and --server, New(Config{...}), the seccomp filter, Serve(ctx), then
// tpm.Close and dir.Close; the pid file and the daemon's readiness follow Ready. A TPM
// that starts at launch starts while the channels are served (requests that need it
// wait on the engine's lock; GET_CAPABILITY does not, and is answered while libtpms
// starts on a thread of its own).
//
// With an engine that has its own data loop (libtpms' ServeConn), every data
// connection (SET_DATAFD, --server listeners, -f) is served in C without entering Go
// per command; control requests take the engine's lock, so no data command falls
// between the steps of one. Engines without one (the test fake) get the Go loop;
// TestDataChannelBothLoops holds both to the same behaviour.
//
// Serve returns an error only when the TPM cannot be started at launch
// (NotNeedInit or Startup); before it returns it sends TPM2_Shutdown (SU_STATE,
// else SU_CLEAR) and stops the TPM, and the caller then closes the Engine and the
// Store.
//
// A permanent blob given by SET_STATEBLOB reaches the Store at the next INIT through
// libtpms itself (MainInit stores a permanent state set by SetState), so the
// destination of a migration keeps its state even if it restarts before the guest
// writes NV (TestRealEngineMigration).
//
// # Idle trim
//
// With Config.IdleTrim (nkp-swtpm: DefaultIdleTrim, 2 s), once the TPM has had no
// control request and no data command for that long (the check comes between one and
// two IdleTrim after the last), the server drops the process' own page-table
// mappings of its read-only file-backed segments with madvise(MADV_DONTNEED)
// (package swtpm/internal/idletrim: private file mappings without write permission
// and without any anonymous page, read afresh from /proc/self/smaps each time; never
// RELRO, data, heap, stacks or [vdso]). Why: a vTPM spends nearly all its life idle,
// yet its start (flag parsing, the state's key derivation and decryption, libtpms'
// init and self-tests, the runtime reading its tables) leaves 4.8 MB of the static
// binary mapped in each process, code and tables it will not run again; mapped, they
// count in every vTPM's PSS and the kernel cannot reclaim them. It is lossless: those
// pages were never written, so they are the file's pages in the page cache, and what
// the process touches again faults back in, as after reclaim under memory pressure.
// What an idle process still runs (the runtime's scheduler and timers) comes back in
// whole page-cache folios (64 KB to 1 MB), so about 2 MB stays mapped. The cost falls
// on the first command after a trim, which takes those minor faults (BENCHMARKS.md,
// vTPM, has the figure); the trim itself reads smaps without allocating (a heap that
// grew would cost more than the trim frees). Activity is counted without a call into
// Go per command (the engine's data loop keeps its own count, DataLoopCommands).
// While the TPM stays idle the next looks come after 4, 8, ... up to 64 s, and it
// trims again only after new activity, so an idle vTPM wakes about once a minute.
// Logged at debug level (--log level=2 or more) with the KiB unmapped. nkp-swtpm
// turns it off with NKP_SWTPM_IDLE_TRIM=off (package swtpm/cli).
//
// Limits, as swtpm 0.7.1 behaves where it has them (checked by a differential test):
//   - data channel: a command whose declared size is below 10 or above the engine's
//     buffer (4096) gets TPM_RC_COMMAND_SIZE and the connection is closed (the size
//     is the only framing; QEMU and TSS never exceed the negotiated size);
//   - control channel: a HASH_DATA over 4096 bytes or a SET_STATEBLOB over 512 KiB is
//     refused with BAD_PARAMETER and the connection closed; a message cut short
//     closes the connection after MessageTimeout without a reply, except a short
//     SET_BUFFERSIZE, GET_INFO or LOCK_STORAGE, which is answered BAD_PARAMETER on
//     the same connection (swtpm answers at once; nkp waits MessageTimeout for the
//     rest first, so a request split across writes is not refused);
//   - GET_STATEBLOB of an unknown blob type answers 0x800 (absent) in the 16-byte
//     layout.
package swtpm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nkp-dev/nkp/swtpm/data"
	"github.com/nkp-dev/nkp/swtpm/internal/idletrim"
)

// Server is one vTPM served over swtpm's control and data channels.
type Server struct {
	cfg        Config
	log        *slog.Logger
	maxCommand int // largest command the data channel frames (libtpms' max buffer); set by New

	// cs is the engine's own data loop, if it has one (libtpms does): data
	// connections are then served by it, outside the Go scheduler (serveDataFD).
	cs connServer

	// tpmMu guards the fields below it. Around each use of the TPM the server takes
	// it and the engine's lock (lockTPM), never while reading or writing a socket; the
	// engine's data loop takes the engine's lock alone, around each command.
	tpmMu        sync.Mutex
	running      bool        // between a successful start (INIT) and STOP/SHUTDOWN/failure
	lastCmd      uint32      // TPM_CC of the last command sent through processLocked since start
	dataFD       io.Closer   // the data connection that came by SET_DATAFD, if any
	dataConnOpen bool        // Config.DataConn is still being served
	ctrlGone     atomic.Bool // Config.CtrlConn (a one-shot control connection) closed, or no control channel
	lockReleased bool        // the store's lock went to a migration destination

	// activity counts control requests and Go-loop data commands (the engine's own
	// data loop counts its commands itself), for the idle trim (trimWhenIdle).
	activity atomic.Uint64
	trim     func() (idletrim.Result, error) // a Trimmer's Trim when nil; tests replace it

	// connMu guards the set of open connections, closed when Serve stops.
	connMu sync.Mutex
	conns  map[io.Closer]struct{}
	closed bool

	ctx      context.Context // Serve's context, for store calls that wait
	stopOnce sync.Once
	stop     chan struct{} // closed to end Serve
	stopWhy  string
	wg       sync.WaitGroup

	ready    chan struct{} // closed once serving (and the TPM started, if at launch)
	launched chan struct{} // closed once the start at launch is over (at once without one)
	done     chan struct{} // closed when Serve has returned
	err      error         // what Serve returned; set before done is closed
}

// New checks cfg and returns a server ready to Serve. It does not touch the TPM yet.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MessageTimeout == 0 {
		cfg.MessageTimeout = DefaultMessageTimeout
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg:      cfg,
		log:      log,
		conns:    make(map[io.Closer]struct{}),
		stop:     make(chan struct{}),
		ready:    make(chan struct{}),
		launched: make(chan struct{}),
		done:     make(chan struct{}),
		ctx:      context.Background(),
	}
	_, _, maxSize, err := cfg.Engine.SetBufferSize(0)
	if err != nil || maxSize == 0 {
		maxSize = 4096
	}
	s.maxCommand = int(maxSize)
	s.cs, _ = cfg.Engine.(connServer)
	return s, nil
}

// Serve serves the control and data channels until ctx ends, a control client sends
// SHUTDOWN, or a configured terminate condition hits (Config.Terminate,
// Config.CtrlTerminate). Before it returns it sends TPM2_Shutdown if needed, stops the
// TPM and closes the listeners and connections of Config. A nil error means an orderly
// end; an error means the TPM could not be started (Config.NotNeedInit, Startup).
// Serve may be called once; Ready, Done and Err tell its progress to other goroutines.
//
// When the TPM starts at launch, Serve starts it while the channels are already
// served: a request that needs the TPM waits until it started (or failed), one that
// does not (GET_CAPABILITY) is answered at once, so a client is not held up by the
// state's decryption and TPM2_Startup. The channel goroutines get the CPU before the
// start begins, so a client already waiting is answered first.
func (s *Server) Serve(ctx context.Context) (err error) {
	defer func() {
		s.err = err
		close(s.done)
	}()
	s.ctx = ctx
	launch := s.cfg.NotNeedInit || s.cfg.Startup != StartupNone
	if launch {
		// Taken before any client is served, so that the start comes first: control
		// and Go-loop data requests wait on tpmMu, the engine's data loop on launched.
		// The engine's lock (which pins the goroutine to its OS thread) is taken only
		// after the yield below, so that yielding needs no second thread.
		s.tpmMu.Lock()
	}
	s.dataConnOpen = s.cfg.DataConn != nil
	if s.cfg.CtrlConn == nil && s.cfg.CtrlListener == nil {
		// Data-only (swtpm without --ctrl): set before any data connection is served,
		// so that the end of the one DataConn stops the server, as nothing can reach
		// the TPM any more.
		s.ctrlGone.Store(true)
	} else {
		s.goServe(func() { s.serveCtrl() })
	}
	if s.cfg.StatusListener != nil {
		s.goServe(func() { s.serveStatus(s.cfg.StatusListener) })
	}
	switch {
	case s.cfg.DataListener != nil:
		s.goServe(func() { s.acceptData(s.cfg.DataListener) })
	case s.cfg.DataConn != nil:
		s.goServe(func() { s.serveDataConn(s.cfg.DataConn, "data fd") })
	}
	var startErr error
	if launch {
		// Let the channel goroutines run first: a control client that is already
		// waiting (libvirt, swtpm_setup and QEMU poll the socket right after the
		// start) gets its GET_CAPABILITY answered before the TPM's start takes the
		// CPU. nkp-swtpm runs with one P, so without this the answer waits for
		// MainInit and for the scheduler to hand the P over during TPM2_Startup.
		runtime.Gosched()
		s.serving()
		if s.cs != nil {
			s.cs.Lock()
		}
		// A client that connects while the TPM starts is answered too: the start's
		// libtpms calls run on a thread of their own while this goroutine waits in
		// the poller, so the one P stays free for the channel goroutines.
		ot, _ := s.cfg.Engine.(offThreadEngine)
		if ot != nil {
			ot.SetOffThread(true)
		}
		startErr = s.startAtLaunchLocked()
		if ot != nil {
			ot.SetOffThread(false)
		}
		s.unlockTPM()
	} else {
		s.serving()
	}
	close(s.launched)
	if startErr != nil {
		s.requestStop("the TPM did not start")
	} else {
		close(s.ready)
		if s.cfg.IdleTrim > 0 {
			s.goServe(s.trimWhenIdle)
		}
	}

	select {
	case <-ctx.Done():
		s.requestStop("context ended")
	case <-s.stop:
	}
	s.closeAll()
	s.wg.Wait()

	s.lockTPM()
	s.stopTPMLocked("exit")
	s.unlockTPM()
	if startErr != nil {
		return startErr
	}
	s.log.Info("vTPM server stopped", "reason", s.stopWhy)
	return nil
}

// serving calls Config.Serving, if set.
func (s *Server) serving() {
	if s.cfg.Serving != nil {
		s.cfg.Serving()
	}
}

// offThreadEngine is an engine that can make its libtpms calls on a thread of their
// own while the caller waits in Go's poller (*libtpms.TPM); Serve uses it for the
// start at launch. Set under the engine's lock.
type offThreadEngine interface {
	SetOffThread(on bool)
}

// Ready returns a channel that is closed once Serve serves: its channels take clients
// and, when the TPM starts at launch (Config.NotNeedInit, Startup), the TPM started
// and TPM2_Startup succeeded. It is never closed when that start failed; Done is.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Done returns a channel that is closed when Serve has returned: the TPM is stopped
// (its state saved) and every listener and connection of Config is closed.
func (s *Server) Done() <-chan struct{} { return s.done }

// Err returns what Serve returned once Done is closed (nil for an orderly end), and
// nil before.
func (s *Server) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// lockTPM takes tpmMu and the engine's lock: what every use of the TPM runs under.
func (s *Server) lockTPM() {
	s.tpmMu.Lock()
	if s.cs != nil {
		s.cs.Lock()
	}
}

func (s *Server) unlockTPM() {
	if s.cs != nil {
		s.cs.Unlock()
	}
	s.tpmMu.Unlock()
}

func (s *Server) goServe(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

// requestStop ends Serve; the first reason given is kept.
func (s *Server) requestStop(why string) {
	s.stopOnce.Do(func() {
		s.stopWhy = why
		close(s.stop)
	})
}

func (s *Server) stopping() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// track registers c so that closeAll closes it; it returns false (and closes c) when
// the server is already closing.
func (s *Server) track(c io.Closer) bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.closed {
		c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c io.Closer) {
	s.connMu.Lock()
	delete(s.conns, c)
	s.connMu.Unlock()
	c.Close()
}

// closeAll closes the listeners and every open connection, which unblocks the goroutines.
func (s *Server) closeAll() {
	s.connMu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = map[io.Closer]struct{}{}
	s.connMu.Unlock()
	for c := range conns {
		c.Close()
	}
	for _, c := range []io.Closer{s.cfg.CtrlListener, s.cfg.CtrlConn, s.cfg.DataListener, s.cfg.DataConn, s.cfg.StatusListener} {
		if c != nil {
			c.Close()
		}
	}
}

// accept runs an accept loop that serves one client at a time, as swtpm does (a second
// client waits in the listen backlog until the first one is gone).
func (s *Server) accept(l net.Listener, what string, serve func(net.Conn)) {
	for {
		c, err := l.Accept()
		if err != nil {
			if s.stopping() || errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			s.log.Error("accept failed; the channel stops accepting clients", "channel", what, "err", err)
			s.requestStop(fmt.Sprintf("%s accept: %v", what, err))
			return
		}
		if !s.track(c) {
			return
		}
		serve(c)
		if s.stopping() {
			return
		}
	}
}

// writeAll writes one response with one Write, bounded by WriteTimeout.
func (s *Server) writeAll(c net.Conn, b []byte) error {
	if err := c.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout)); err != nil && !errors.Is(err, net.ErrClosed) {
		s.log.Debug("set write deadline failed", "err", err)
	}
	_, err := c.Write(b)
	return err
}

// newDataReader frames commands from c.
func (s *Server) newDataReader(c net.Conn) *data.Reader {
	return data.NewReader(c, s.maxCommand, s.cfg.MessageTimeout)
}
