// Package vtpm supervises the nkp-swtpm processes that hostd runs, one per running
// protected VM.
//
// Start runs `nkp-swtpm socket` for a VM with:
//   - its state key on an inherited pipe (--key fd=3,format=binary,mode=aes-256-gcm) and
//     its migration key on another (--migration-key fd=6,format=binary,mode=aes-256-cbc):
//     the keys are in no argv, environment or file;
//   - its control socket created by hostd (root) at RunDir/<vm-uuid>.sock, owned by
//     QEMU's user with mode 0600, and inherited as a listening fd (--ctrl
//     type=unixio,fd=4): QEMU's user and root can connect, no one else, and the socket
//     accepts connections (queued) from the moment Start returns;
//   - its state in StateRoot/<vm-uuid>/<key-id>/ (0700, owned by the vTPM user; the
//     <vm-uuid> directory is root's, 0711), --tpmstate
//     mode=0600, and --terminate as libvirt passes it;
//   - the unprivileged vTPM user's uid and gid and no supplementary groups, in a session
//     of its own (setsid), so that it outlives hostd: running VMs keep their vTPM
//     across a hostd restart or crash;
//   - its stderr appended to StateRoot/<vm-uuid>.log (root, 0600; no key is ever logged);
//   - a status channel RunDir/<vm-uuid>.status (root's, 0600, inherited as fd 7 and named
//     by NKP_SWTPM_STATUS_FD), on which Probe asks the running vTPM for
//     GET_TPMESTABLISHED while QEMU holds the control socket.
//
// Start is Launch then Wait. Launch returns once the keys are in their pipes and the
// VM's slot is reserved, and starts the process in the background (hostd's prepare
// hook); Wait (hostd's start hook) returns once nkp-swtpm reported READY on its
// readiness pipe (fd 5, named by NKP_SWTPM_READY_FD: its socket listens, its state
// directory is locked, its seccomp filter is on), or with its error and its log's last
// lines. Launches take their spawn sections (directories, sockets, records, the fork)
// one at a time, so that a boot storm's launches do not queue in the Go scheduler ahead
// of the hook answers; their waits for READY overlap. The record is written as soon as
// the process runs, before READY; before the spawn an intent record (no pid yet, the
// state directory) takes its place, so that a hostd killed at any instant of a start
// leaves a record: Adopt finds the process an intent record names by its state
// directory in /proc and adopts it (or removes the record and the sockets if the spawn
// never happened). AfterStep lets crash tests stop there.
//
// Each instance has a record RunDir/<vm-uuid>.json (root, 0600: pid, process start time,
// key ID, KDK version). Adopt, run by a new hostd, re-attaches to the processes those
// records name after checking their identity in /proc (same pid and start time, still
// nkp-swtpm on that state directory, not a zombie), and cleans up after the dead ones.
// Exits of started and adopted processes are watched with pidfds; Stop sends SIGTERM,
// then SIGKILL after a grace period, waits for the exit, and removes the socket and the
// record. A child started by this hostd is reaped by it; an adopted one is reaped by
// whoever its parent became (PID 1 under systemd).
//
// Importers: hostd. No cgo.
package vtpm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// Errors.
var (
	ErrRunning    = errors.New("a vTPM is already running for this VM")
	ErrNotRunning = errors.New("no vTPM is running for this VM")
	ErrStart      = errors.New("nkp-swtpm did not start")
)

// Credential is a uid and gid.
type Credential struct {
	UID, GID int
}

// Config says where the supervisor keeps things and as whom it runs them.
type Config struct {
	// Binary is the nkp-swtpm program.
	Binary string
	// StateRoot holds one state directory per VM (hostd's state dir + "/vtpm"). Created
	// 0711 (the vTPM user must traverse it to its own directory).
	StateRoot string
	// RunDir holds the control sockets and the instance records (/run/nkp/vtpm).
	// Created 0711: QEMU's user must traverse it to the socket.
	RunDir string
	// User is the unprivileged user nkp-swtpm runs as.
	User Credential
	// QEMU is the user (and group) that owns the control sockets.
	QEMU Credential
	// StartTimeout bounds Start's wait for nkp-swtpm to be ready (default 10 s).
	StartTimeout time.Duration
	// StopTimeout is the grace period between SIGTERM and SIGKILL (default 5 s).
	StopTimeout time.Duration
	Log         *slog.Logger
	// AfterStep, if set, is called after each step of a start ("intent": the intent
	// record is written; "spawned": nkp-swtpm runs; "recorded": its full record is
	// written). Crash tests kill the process there.
	AfterStep func(step string)
}

// VM names the VM a vTPM belongs to.
type VM struct {
	UUID       string // canonical lower-case
	Name       string
	KeyID      string // the vTPM's key ID (for status and messages; the key comes separately)
	KDKVersion int
}

// Instance is a running (or just ended) vTPM.
type Instance struct {
	VM
	PID        int       `json:"pid"`
	StartTicks uint64    `json:"start_ticks"` // /proc/PID/stat field 22
	Socket     string    `json:"socket"`
	StateDir   string    `json:"state_dir"`
	Started    time.Time `json:"started"`
	// Intent marks the record written before the spawn (no pid yet): Adopt looks the
	// process up by its state directory.
	Intent  bool `json:"intent,omitempty"`
	Adopted bool `json:"-"`
}

type proc struct {
	inst   Instance
	exited chan struct{} // closed when the process has ended
	cmd    *exec.Cmd     // nil for adopted
	// launching is set on the placeholder Launch puts in the slot: closed once the
	// start finished (the placeholder is then replaced, or removed on failure).
	launching chan struct{}
}

// Supervisor runs and tracks the vTPM processes. It is safe for concurrent use.
type Supervisor struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	procs map[string]*proc // by VM UUID; guarded by mu
	// failed holds why the last Launch of a VM failed, for Wait; guarded by mu.
	failed map[string]error
	// exits receives the UUID of every process that ended on its own (not through Stop).
	exits chan string
	// spawning admits one start at a time to the steps up to the spawn and the record
	// (start's spawn section); the waits for readiness overlap.
	spawning chan struct{}
}

// New checks cfg and creates the directories.
func New(cfg Config) (*Supervisor, error) {
	if cfg.Binary == "" || cfg.StateRoot == "" || cfg.RunDir == "" {
		return nil, errors.New("vtpm: Binary, StateRoot and RunDir are required")
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	for _, d := range []string{cfg.StateRoot, cfg.RunDir} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, fmt.Errorf("vtpm: %w", err)
		}
		if err := os.Chmod(d, 0o711); err != nil {
			return nil, fmt.Errorf("vtpm: %w", err)
		}
	}
	return &Supervisor{cfg: cfg, log: cfg.Log, procs: map[string]*proc{}, failed: map[string]error{}, exits: make(chan string, 64), spawning: make(chan struct{}, 1)}, nil
}

// Exits delivers the UUID of each vTPM that ended without Stop (QEMU sent SHUTDOWN or
// closed its connection, or the process died). The caller drains it.
func (s *Supervisor) Exits() <-chan string { return s.exits }

// SocketPath is the control socket of vm's vTPM.
func (s *Supervisor) SocketPath(vmUUID string) string {
	return filepath.Join(s.cfg.RunDir, vmUUID+".sock")
}

// StateDir is the state directory of vm's vTPM under key keyID: StateRoot/<vm-uuid>/<key-id>
// (hostd/vm.StateDir: a rekey writes a new directory and the domain XML's key ID picks
// the one in use).
func (s *Supervisor) StateDir(vmUUID, keyID string) string {
	return filepath.Join(s.cfg.StateRoot, vmUUID, keyID)
}

// statusPath is the root-only socket of vm's vTPM status channel (Probe).
func (s *Supervisor) statusPath(vmUUID string) string {
	return filepath.Join(s.cfg.RunDir, vmUUID+".status")
}

func (s *Supervisor) recordPath(vmUUID string) string {
	return filepath.Join(s.cfg.RunDir, vmUUID+".json")
}

// Get returns vm's running vTPM.
func (s *Supervisor) Get(vmUUID string) (Instance, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.procs[vmUUID]
	if !ok || p.inst.PID == 0 || p.done() {
		return Instance{}, false
	}
	return p.inst, true
}

// List returns the running vTPMs, by UUID.
func (s *Supervisor) List() []Instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Instance
	for _, p := range s.procs {
		if p.inst.PID != 0 && !p.done() {
			out = append(out, p.inst)
		}
	}
	slices.SortFunc(out, func(a, b Instance) int { return strings.Compare(a.UUID, b.UUID) })
	return out
}

// Running is the number of running vTPMs.
func (s *Supervisor) Running() int { return len(s.List()) }

func (p *proc) done() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Keys are the two keys of one vTPM, each kdk.Size bytes, derived from the KDK: State
// encrypts the state files (--key), Migration the state blobs that QEMU carries in its
// migration stream and in `virsh save` images (--migration-key), which would otherwise hold
// the TPM's seeds and NV in plaintext. Every host of the cluster derives the same ones.
type Keys struct {
	State, Migration []byte
}

// Wipe clears both keys.
func (k Keys) Wipe() {
	clear(k.State)
	clear(k.Migration)
}

// Start runs nkp-swtpm for vm with keys (not kept: the caller wipes them) and waits
// until it serves: Launch, then Wait.
func (s *Supervisor) Start(ctx context.Context, vm VM, keys Keys) (Instance, error) {
	if err := s.Launch(vm, keys); err != nil {
		return Instance{}, err
	}
	return s.Wait(ctx, vm.UUID)
}

// Launch starts nkp-swtpm for vm in the background and returns once the keys are in
// their pipes (the caller may wipe keys at once) and the VM's slot is reserved; Wait
// returns when it serves, or why it could not. The prepare hook launches, and the start
// hook (just before QEMU runs) waits: nkp-swtpm's start overlaps libvirt's own work in
// between instead of lengthening the prepare hook.
func (s *Supervisor) Launch(vm VM, keys Keys) (err error) {
	if err := kdk.CheckUUID(vm.UUID); err != nil {
		return fmt.Errorf("vm %q: %w", vm.Name, err)
	}
	if err := kdk.CheckUUID(vm.KeyID); err != nil {
		return fmt.Errorf("vm %q: vTPM key ID: %w", vm.Name, err)
	}
	if len(keys.State) != kdk.Size || len(keys.Migration) != kdk.Size {
		return fmt.Errorf("vm %q: vTPM keys are %d and %d bytes, want %d each", vm.Name, len(keys.State), len(keys.Migration), kdk.Size)
	}
	s.mu.Lock()
	if p, ok := s.procs[vm.UUID]; ok && !p.done() {
		s.mu.Unlock()
		return fmt.Errorf("vm %q (%s): %w (pid %d)", vm.Name, vm.UUID, ErrRunning, p.inst.PID)
	}
	// Reserve the slot while starting, so that two prepares of one VM do not race.
	placeholder := &proc{exited: make(chan struct{}), launching: make(chan struct{})}
	s.procs[vm.UUID] = placeholder
	delete(s.failed, vm.UUID)
	s.mu.Unlock()
	release := func(err error) {
		s.mu.Lock()
		if s.procs[vm.UUID] == placeholder {
			delete(s.procs, vm.UUID)
		}
		if err != nil {
			s.failed[vm.UUID] = err
		}
		s.mu.Unlock()
		close(placeholder.launching)
	}
	keyR, err := keyPipe(keys.State)
	if err != nil {
		release(nil)
		return fmt.Errorf("vm %q: key pipe: %w", vm.Name, err)
	}
	migR, err := keyPipe(keys.Migration)
	if err != nil {
		keyR.Close()
		release(nil)
		return fmt.Errorf("vm %q: migration key pipe: %w", vm.Name, err)
	}
	go func() {
		_, err := s.start(vm, keyR, migR)
		release(err) // on success start put the process in the slot already
	}()
	return nil
}

// Wait waits for vm's vTPM to serve if Launch is starting it, and returns it: ErrNotRunning
// if there is none, or why the last Launch failed (wrapping ErrStart).
func (s *Supervisor) Wait(ctx context.Context, vmUUID string) (Instance, error) {
	for {
		s.mu.Lock()
		p, ok := s.procs[vmUUID]
		failed := s.failed[vmUUID]
		s.mu.Unlock()
		switch {
		case !ok && failed != nil:
			return Instance{}, failed
		case !ok || p.done() && p.launching == nil:
			return Instance{}, fmt.Errorf("vTPM of %s: %w", vmUUID, ErrNotRunning)
		case p.launching == nil:
			return p.inst, nil
		}
		select {
		case <-p.launching:
		case <-ctx.Done():
			return Instance{}, fmt.Errorf("vTPM of %s: still starting: %w", vmUUID, ctx.Err())
		}
	}
}

// start runs nkp-swtpm for vm with its keys in the pipes keyR and migR (closed here) and
// waits until it serves, at most StartTimeout; on success the process takes vm's slot.
func (s *Supervisor) start(vm VM, keyR, migR *os.File) (inst Instance, err error) {
	defer keyR.Close()
	defer migR.Close()
	ctx := context.Background()
	// One spawn section at a time. In a boot storm, 50 launches at once would otherwise
	// be 50 goroutines making system calls (directories, sockets, records, the fork),
	// queued in the Go scheduler ahead of the goroutines that answer hooks while
	// libvirtd's workers wait; one at a time they take turns with them. Forks are
	// serialised by syscall.ForkLock anyway, and the readiness waits below still overlap.
	s.spawning <- struct{}{}
	endSpawn := sync.OnceFunc(func() { <-s.spawning })
	defer endSpawn()
	stateDir := s.StateDir(vm.UUID, vm.KeyID)
	if err := ensureDir(filepath.Dir(stateDir), Credential{0, 0}, 0o711); err != nil {
		return Instance{}, fmt.Errorf("vm %q: vTPM state: %w", vm.Name, err)
	}
	if err := ensureDir(stateDir, s.cfg.User, 0o700); err != nil {
		return Instance{}, fmt.Errorf("vm %q: vTPM state: %w", vm.Name, err)
	}
	logFile, err := os.OpenFile(filepath.Join(s.cfg.StateRoot, vm.UUID+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return Instance{}, fmt.Errorf("vm %q: vTPM log: %w", vm.Name, err)
	}
	defer logFile.Close()
	logStart, _ := logFile.Seek(0, io.SeekEnd)

	sockPath := s.SocketPath(vm.UUID)
	sock, err := s.listen(sockPath)
	if err != nil {
		return Instance{}, fmt.Errorf("vm %q: vTPM socket: %w", vm.Name, err)
	}
	defer sock.Close()
	defer func() {
		if err != nil {
			os.Remove(sockPath)
		}
	}()

	statusPath := s.statusPath(vm.UUID)
	status, err := s.listenRoot(statusPath)
	if err != nil {
		return Instance{}, fmt.Errorf("vm %q: vTPM status socket: %w", vm.Name, err)
	}
	defer status.Close()
	defer func() {
		if err != nil {
			os.Remove(statusPath)
		}
	}()

	// Readiness: nkp-swtpm writes "READY" (or "ERROR why") on this pipe once its socket
	// listens, its state is locked and its seccomp filter is on (swtpm/cli's readiness
	// pipe, NKP_SWTPM_READY_FD), and closes it; an exit closes it too. hostd wakes at once
	// (it polled a pid file before, which added up to 20 ms to every prepare).
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return Instance{}, fmt.Errorf("vm %q: readiness pipe: %w", vm.Name, err)
	}
	defer readyR.Close()
	defer readyW.Close()
	args, err := cmdline.Build(&cmdline.Options{
		TPM2:  true,
		Ctrl:  &cmdline.Channel{Type: cmdline.TypeUnixIO, ListenFD: 4},
		State: &cmdline.StateOptions{Dir: stateDir, Mode: 0o600},
		Key:   &cmdline.KeyOptions{FD: 3, Format: cmdline.FormatBinary, Mode: "aes-256-gcm"},
		// swtpm's blob envelope knows AES-CBC (+HMAC) only; both ends derive this key.
		MigrationKey: &cmdline.KeyOptions{FD: 6, Format: cmdline.FormatBinary, Mode: "aes-256-cbc"},
		Terminate:    true,
	})
	if err != nil {
		return Instance{}, fmt.Errorf("vm %q: nkp-swtpm command line: %w", vm.Name, err)
	}
	cmd := exec.Command(s.cfg.Binary, append([]string{"socket"}, args...)...)
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "NKP_SWTPM_READY_FD=5", "NKP_SWTPM_STATUS_FD=7"}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = []*os.File{keyR, sock, readyW, migR, status} // fds 3, 4, 5, 6, 7
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:     true,
		Credential: &syscall.Credential{Uid: uint32(s.cfg.User.UID), Gid: uint32(s.cfg.User.GID), Groups: []uint32{}},
	}
	// An intent record before the spawn: a hostd killed between the spawn and the full
	// record below leaves this one, naming the state directory, so that the next hostd's
	// Adopt finds the process by it instead of leaving it running unknown with the
	// state's lock (the VM could not start again). The full record replaces it in one
	// rename: there is no instant with neither.
	recPath := s.recordPath(vm.UUID)
	if err := writeRecord(recPath, Instance{VM: vm, Socket: sockPath, StateDir: stateDir, Intent: true}); err != nil {
		return Instance{}, fmt.Errorf("vm %q: vTPM record: %w", vm.Name, err)
	}
	s.afterStep("intent")
	started := time.Now()
	if err := cmd.Start(); err != nil {
		os.Remove(recPath)
		return Instance{}, fmt.Errorf("vm %q: %w: %w", vm.Name, ErrStart, err)
	}
	s.afterStep("spawned")
	p := &proc{cmd: cmd, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(p.exited)
	}()
	keyR.Close()
	sock.Close()
	readyW.Close()
	status.Close()

	// The record first, then the wait: a hostd killed while nkp-swtpm starts (between the
	// prepare and start hooks) leaves a record, so the next hostd adopts the process
	// instead of leaving it running unknown, holding the state's lock.
	ticks, err := startTicks(cmd.Process.Pid)
	if err != nil {
		if rerr := waitReady(ctx, p, readyR, time.Second); rerr != nil {
			err = rerr // it exited already: say so, with its log
		}
		cmd.Process.Kill()
		<-p.exited
		os.Remove(recPath)
		return Instance{}, fmt.Errorf("vm %q: %w: %w; its log says: %s", vm.Name, ErrStart, err, tail(logFile.Name(), logStart))
	}
	p.inst = Instance{VM: vm, PID: cmd.Process.Pid, StartTicks: ticks, Socket: sockPath, StateDir: stateDir, Started: started}
	if err := writeRecord(recPath, p.inst); err != nil {
		cmd.Process.Kill()
		<-p.exited
		os.Remove(recPath)
		return Instance{}, fmt.Errorf("vm %q: vTPM record: %w", vm.Name, err)
	}
	s.afterStep("recorded")
	endSpawn()
	if err := waitReady(ctx, p, readyR, s.cfg.StartTimeout); err != nil {
		cmd.Process.Kill()
		<-p.exited
		os.Remove(recPath)
		return Instance{}, fmt.Errorf("vm %q: %w: %w; its log says: %s", vm.Name, ErrStart, err, tail(logFile.Name(), logStart))
	}
	s.mu.Lock()
	s.procs[vm.UUID] = p
	s.mu.Unlock()
	go s.watch(p)
	s.log.Info("vTPM started", "vm", vm.Name, "uuid", vm.UUID, "key_id", vm.KeyID, "kdk_version", vm.KDKVersion, "pid", p.inst.PID, "took", time.Since(started))
	return p.inst, nil
}

func (s *Supervisor) afterStep(step string) {
	if s.cfg.AfterStep != nil {
		s.cfg.AfterStep(step)
	}
}

// listen creates the control socket, owned by QEMU's user, mode 0600.
func (s *Supervisor) listen(path string) (*os.File, error) {
	return s.listenAs(path, s.cfg.QEMU)
}

// listenRoot creates a socket only root can connect to (0600, root's).
func (s *Supervisor) listenRoot(path string) (*os.File, error) {
	return s.listenAs(path, Credential{0, 0})
}

func (s *Supervisor) listenAs(path string, owner Credential) (*os.File, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	// Before the chmod the socket has the umask's mode; connecting needs write
	// permission, which the umask never grants to others in hostd (0077 in its unit,
	// 0022 at worst), and the directory is root's.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	if err := os.Chmod(path, 0o600); err != nil {
		os.Remove(path)
		return nil, err
	}
	if err := os.Lchown(path, owner.UID, owner.GID); err != nil {
		os.Remove(path)
		return nil, err
	}
	f, err := l.File() // a dup: stays listening after l.Close
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return f, nil
}

func ensureDir(dir string, owner Credential, mode os.FileMode) error {
	if err := os.Mkdir(dir, mode); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != owner.UID || int(st.Gid) != owner.GID {
		if err := os.Lchown(dir, owner.UID, owner.GID); err != nil {
			return err
		}
	}
	if fi.Mode().Perm() != mode {
		return os.Chmod(dir, mode)
	}
	return nil
}

// waitReady reads nkp-swtpm's readiness pipe: "READY" once it serves, "ERROR why" if it
// could not, end of file if it exited first; bounded by ctx and timeout.
func waitReady(ctx context.Context, p *proc, ready *os.File, timeout time.Duration) error {
	ready.SetReadDeadline(time.Now().Add(timeout))
	stop := context.AfterFunc(ctx, func() { ready.SetReadDeadline(time.Now()) })
	defer stop()
	line, err := bufio.NewReader(io.LimitReader(ready, 4096)).ReadString('\n')
	switch {
	case line == "READY\n":
		return nil
	case strings.HasPrefix(line, "ERROR "):
		return errors.New(strings.TrimSpace(strings.TrimPrefix(line, "ERROR ")))
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("not serving after %v", timeout)
	}
	select {
	case <-p.exited:
		return fmt.Errorf("it exited (%v) before serving", p.cmd.ProcessState)
	case <-time.After(time.Second):
		return fmt.Errorf("it closed its readiness pipe without serving (%q, %v)", line, err)
	}
}

// tail returns the log written since offset, last 5 lines, on one line.
func tail(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	f.Seek(offset, io.SeekStart)
	b, _ := io.ReadAll(io.LimitReader(f, 64<<10))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	// The log is written by the unprivileged vTPM and ends up in a hook reply, which must
	// be UTF-8 (an invalid one is not delivered and the refusal's sentence is lost), and
	// on the virsh user's terminal: no escape sequences.
	for i, l := range lines {
		lines[i] = strings.Map(func(r rune) rune {
			if r < 0x20 || r == 0x7f || 0x80 <= r && r < 0xa0 {
				return '?'
			}
			return r
		}, strings.ToValidUTF8(l, "?"))
	}
	s := strings.Join(lines, " | ")
	if s == "" {
		return "(nothing)"
	}
	return s
}

// watch waits for p to end. An end not caused by Stop removes the socket and record and
// is reported on Exits.
func (s *Supervisor) watch(p *proc) {
	<-p.exited
	s.mu.Lock()
	current := s.procs[p.inst.UUID] == p
	if current {
		delete(s.procs, p.inst.UUID)
	}
	s.mu.Unlock()
	if !current {
		return // Stop or a newer instance took over
	}
	s.cleanup(p.inst)
	s.log.Info("vTPM ended", "vm", p.inst.Name, "uuid", p.inst.UUID, "pid", p.inst.PID)
	select {
	case s.exits <- p.inst.UUID:
	default:
	}
}

func (s *Supervisor) cleanup(inst Instance) {
	// Remove the socket only if it is still this instance's (a new Start replaced it
	// otherwise; Start holds the slot, so this is a check against a stale record).
	os.Remove(inst.Socket)
	os.Remove(s.statusPath(inst.UUID))
	os.Remove(s.recordPath(inst.UUID))
}

// Stop ends vm's vTPM: SIGTERM, SIGKILL after the grace period, and waits until it has
// ended. It returns ErrNotRunning if there is none.
func (s *Supervisor) Stop(ctx context.Context, vmUUID string) error {
	if _, err := s.Wait(ctx, vmUUID); err != nil && ctx.Err() != nil {
		return err // still starting when ctx ended
	}
	s.mu.Lock()
	delete(s.failed, vmUUID)
	p, ok := s.procs[vmUUID]
	if ok && p.launching != nil {
		s.mu.Unlock()
		return fmt.Errorf("vTPM of %s: launched again while being stopped", vmUUID)
	}
	if ok {
		delete(s.procs, vmUUID)
	}
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("vTPM of %s: %w", vmUUID, ErrNotRunning)
	}
	defer s.cleanup(p.inst)
	if p.done() {
		return nil
	}
	if err := s.signal(p, syscall.SIGTERM); err != nil {
		return err
	}
	t := time.NewTimer(s.cfg.StopTimeout)
	defer t.Stop()
	select {
	case <-p.exited:
		s.log.Info("vTPM stopped", "vm", p.inst.Name, "uuid", vmUUID, "pid", p.inst.PID)
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	s.log.Warn("vTPM did not end on SIGTERM: killing it", "vm", p.inst.Name, "uuid", vmUUID, "pid", p.inst.PID)
	if err := s.signal(p, syscall.SIGKILL); err != nil {
		return err
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(s.cfg.StopTimeout):
		return fmt.Errorf("vTPM of %s (pid %d): still running after SIGKILL", vmUUID, p.inst.PID)
	}
}

// signal sends sig to p, through a pidfd so that a recycled pid is never hit.
func (s *Supervisor) signal(p *proc, sig syscall.Signal) error {
	if p.cmd != nil {
		if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("vTPM pid %d: %w", p.inst.PID, err)
		}
		return nil
	}
	fd, err := unix.PidfdOpen(p.inst.PID, 0)
	if err != nil {
		return nil // gone
	}
	defer unix.Close(fd)
	if ok, _ := sameProcess(p.inst); !ok {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("vTPM pid %d: %w", p.inst.PID, err)
	}
	return nil
}

// Adopt reads the instance records left by an earlier hostd, re-attaches to the vTPMs
// that still run and removes what the dead ones left. It returns the adopted instances.
func (s *Supervisor) Adopt() ([]Instance, error) {
	ents, err := os.ReadDir(s.cfg.RunDir)
	if err != nil {
		return nil, fmt.Errorf("vtpm: %w", err)
	}
	var out []Instance
	for _, e := range ents {
		name := e.Name()
		uuid, ok := strings.CutSuffix(name, ".json")
		if !ok || kdk.CheckUUID(uuid) != nil {
			if strings.HasPrefix(name, ".pid-") || atomicfile.IsTemp(name) { // a crash's leftovers
				os.Remove(filepath.Join(s.cfg.RunDir, name))
			}
			continue
		}
		path := filepath.Join(s.cfg.RunDir, name)
		inst, err := readRecord(path)
		if err != nil || inst.UUID != uuid {
			s.log.Warn("vTPM record unreadable: removed", "path", path, "err", err)
			os.Remove(path)
			continue
		}
		if inst.Intent {
			// An earlier hostd died between writing the intent and the full record: the
			// process it spawned (if the spawn happened) is found by its state directory.
			found, ok := findByStateDir(inst)
			if !ok {
				s.log.Info("vTPM start of an earlier hostd left no process", "vm", inst.Name, "uuid", uuid)
				s.cleanup(inst)
				continue
			}
			inst = found
			if err := writeRecord(path, inst); err != nil {
				// Not adoptable across another restart: stop it rather than leave an orphan.
				s.log.Warn("vTPM found by an intent record, but its record cannot be written: stopping it", "vm", inst.Name, "uuid", uuid, "pid", inst.PID, "err", err)
				s.kill(inst)
				s.cleanup(inst)
				continue
			}
			s.log.Info("vTPM found by an earlier hostd's intent record", "vm", inst.Name, "uuid", uuid, "pid", inst.PID)
		}
		alive, why := sameProcess(inst)
		if !alive {
			s.log.Info("vTPM of an earlier hostd has ended", "vm", inst.Name, "uuid", uuid, "pid", inst.PID, "why", why)
			s.cleanup(inst)
			continue
		}
		fd, err := unix.PidfdOpen(inst.PID, 0)
		if err != nil {
			s.cleanup(inst)
			continue
		}
		inst.Adopted = true
		p := &proc{inst: inst, exited: make(chan struct{})}
		s.mu.Lock()
		if old, ok := s.procs[uuid]; ok && !old.done() {
			s.mu.Unlock()
			unix.Close(fd)
			continue
		}
		s.procs[uuid] = p
		s.mu.Unlock()
		go func() {
			waitPidfd(fd)
			unix.Close(fd)
			close(p.exited)
		}()
		go s.watch(p)
		s.log.Info("vTPM adopted", "vm", inst.Name, "uuid", uuid, "pid", inst.PID, "key_id", inst.KeyID)
		out = append(out, inst)
	}
	return out, nil
}

// findByStateDir looks for the nkp-swtpm process that an intent record names: a live
// process running on the record's state directory (only one can: it holds the state's
// lock). It returns the record completed with that process's pid and start time.
func findByStateDir(intent Instance) (Instance, bool) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return Instance{}, false
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !bytes.Contains(cmdline, []byte("dir="+intent.StateDir)) {
			continue
		}
		// The state directory ends the dir= option (",mode=" follows) or the argument.
		if !stateDirArg(cmdline, intent.StateDir) {
			continue
		}
		ticks, err := startTicks(pid)
		if err != nil {
			continue
		}
		inst := intent
		inst.Intent = false
		inst.PID, inst.StartTicks = pid, ticks
		if ok, _ := sameProcess(inst); ok {
			return inst, true
		}
	}
	return Instance{}, false
}

// stateDirArg reports whether cmdline (NUL-separated) has an argument with the option
// dir=DIR, DIR exactly (not a longer path that starts with it).
func stateDirArg(cmdline []byte, dir string) bool {
	for _, arg := range strings.Split(string(cmdline), "\x00") {
		for _, opt := range strings.Split(arg, ",") {
			if opt == "dir="+dir {
				return true
			}
		}
	}
	return false
}

// kill sends SIGKILL to inst's process, through a pidfd after checking its identity.
func (s *Supervisor) kill(inst Instance) {
	s.signal(&proc{inst: inst}, syscall.SIGKILL)
}

// waitPidfd blocks until the process behind fd has ended (zombie or reaped).
func waitPidfd(fd int) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n > 0 {
			return
		}
	}
}

// sameProcess checks that inst's pid is still the process that was started: same start
// time, not a zombie, and running nkp-swtpm (or swtpm) on inst's state directory.
func sameProcess(inst Instance) (bool, string) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", inst.PID))
	if err != nil {
		return false, "no such process"
	}
	state, ticks, err := parseStat(raw)
	if err != nil {
		return false, err.Error()
	}
	if ticks != inst.StartTicks {
		return false, "pid reused by another process"
	}
	if state == 'Z' || state == 'X' {
		return false, "ended (zombie)"
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", inst.PID))
	if err != nil {
		return false, "no such process"
	}
	if !bytes.Contains(cmdline, []byte("dir="+inst.StateDir)) {
		return false, "another program"
	}
	return true, ""
}

func startTicks(pid int) (uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	_, t, err := parseStat(raw)
	return t, err
}

// parseStat returns the state (field 3) and start time (field 22) of /proc/PID/stat.
// The command name (field 2) is in parentheses and may contain anything, so fields are
// counted from the last ')'.
func parseStat(raw []byte) (byte, uint64, error) {
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0, 0, errors.New("unreadable /proc stat")
	}
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, errors.New("unreadable /proc stat")
	}
	t, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("unreadable /proc stat start time: %w", err)
	}
	return f[0][0], t, nil
}

func writeRecord(path string, inst Instance) error {
	b, err := json.Marshal(inst)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

func readRecord(path string) (Instance, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Instance{}, err
	}
	var inst Instance
	if err := json.Unmarshal(b, &inst); err != nil {
		return Instance{}, err
	}
	if inst.StateDir == "" || inst.PID <= 1 && !(inst.Intent && inst.PID == 0) {
		return Instance{}, errors.New("record without pid or state directory")
	}
	return inst, nil
}

// keyPipe returns the read end of a pipe that holds key and is closed for writing: a key is
// 32 bytes, far below a pipe's buffer, so the write never blocks.
func keyPipe(key []byte) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	_, err = w.Write(key)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}
