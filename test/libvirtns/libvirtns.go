// Package libvirtns runs a private libvirtd — a second (third, …) "host" on one machine —
// for nkp's end-to-end tests and benchmarks.
//
// Each Host lives in its own network namespace (ip netns) and its own mount namespace, in
// which libvirt's directories (/etc/libvirt with its hooks, /run/libvirt,
// /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) and any extra directories the
// caller names (nkp's /run/nkp and /var/lib/nkp) are bind mounts of directories under
// the Host's work directory, and /etc/hosts is the machine's with the Host's name added
// (hostsFile). A virtlogd and a libvirtd run inside, with their own
// host_uuid, so libvirt accepts migrations between two Hosts; Link joins two Hosts' network
// namespaces with a veth pair for migration traffic. Hook files installed in a Host touch
// no other libvirtd, and programs started with Host.Command (nkp-hostd) see the same
// default paths as on a real host.
//
// Processes: the namespaces are held by a `sleep` child; Close destroys the domains,
// kills every process in the Host's network namespace (libvirtd, virtlogd, QEMU, swtpm,
// and whatever the caller started inside), deletes the namespace and removes the work
// directory. QEMU processes are daemonized by libvirtd, so their parent is PID 1: on a
// machine whose PID 1 does not reap (see the environment notes) a killed QEMU stays a
// zombie until the machine's init reaps it.
//
// Only test code and benchmark commands import this package. Everything here needs root.
//
// Uplink joins a Host to the root namespace (root 10.78.n.1, or that of the next subnet
// free on the machine, is the Host's Gateway, the Host .2 with its default route through
// it): the tests' nkp-provider serves on the first Host's Gateway with that name in its
// certificate, and every Host reaches it.
// RemoveStale deletes nkpe2e-* namespaces without processes (a test binary killed by
// its timeout skips Close). Private libvirtds run QEMU without cgroups
// (cgroup_controllers = [ ]): the machine's cgroup tree is shared and libvirt names a
// group machine/qemu-ID-NAME, so a migrating VM would have one group on both Hosts.
// Config.Cgroups keeps libvirt's default placement for a Host that migrates nothing
// (hookbench -cgroups).
package libvirtns

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
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

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

// Tools are the programs a Host needs on $PATH.
var Tools = []string{"ip", "nsenter", "unshare", "mount", "libvirtd", "virtlogd", "virsh"}

// libvirtDirs are made private in every Host: real path → subdirectory of the work dir.
var libvirtDirs = []struct{ path, sub string }{
	{"/etc/libvirt", "etc-libvirt"},
	{"/run/libvirt", "run-libvirt"},
	{"/var/lib/libvirt", "lib-libvirt"},
	{"/var/cache/libvirt", "cache-libvirt"},
	{"/var/log/libvirt", "log-libvirt"},
}

// Config describes one Host.
type Config struct {
	// Name is 1..6 characters of [a-z0-9]; it becomes the hostname and part of the
	// network namespace's name, with a random suffix so concurrent runs do not collide.
	Name string
	// Dir is the work directory; "" makes one under os.TempDir. Close removes it.
	Dir string
	// Private lists extra absolute directories that get a private, empty copy inside the
	// Host, such as /run/nkp and /var/lib/nkp. Each is created on the real root file
	// system if missing (empty; nothing is written there).
	Private []string
	// Tmpfs lists entries of Private whose private copy is a tmpfs, as /run is on a real
	// host (fsync there costs nothing; on this machine's /tmp it is a disk flush).
	Tmpfs []string
	// Hooks are files installed as /etc/libvirt/hooks/qemu.d/NAME (mode 0755) before
	// libvirtd starts: map NAME → content.
	Hooks map[string][]byte
	// Log receives the output of libvirtd and virtlogd; nil discards it.
	Log io.Writer
	// Cgroups leaves libvirt's default cgroup placement on: each QEMU in a group under
	// machine/ (qemu-ID-NAME…), so that all QEMUs share one group's CPU weight against
	// the host's services, instead of running QEMU without cgroups. Only for a Host
	// whose domain names are unique on the machine and which takes part in no migration
	// (benchmarks): the cgroup tree is the machine's.
	Cgroups bool
}

// Host is one private libvirtd with its namespaces.
type Host struct {
	Name  string // hostname inside the Host
	Dir   string // work directory (0711: QEMU's user traverses it)
	NetNS string // ip netns name
	URI   string // libvirt URI of this Host's libvirtd, usable from outside
	IP    string // address on the link to another Host ("" before Link)
	// Gateway is the root network namespace's address on the Host's uplink ("" before
	// Uplink): a server in the root namespace listening there is reachable from every
	// Host with an uplink (each has its default route through its own uplink).
	Gateway string

	cfg      Config
	holder   *exec.Cmd
	virtlogd *proc
	libvirtd *proc
	closed   bool
	tmpfs    []string // mounted in the root namespace; unmounted by Close
}

// proc is a process started by the Host and reaped by a goroutine.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Start builds a Host's directories, creates its namespaces and starts virtlogd and
// libvirtd in them, returning once libvirtd answers. On error nothing is left behind.
func Start(ctx context.Context, cfg Config) (h *Host, err error) {
	if len(cfg.Name) == 0 || len(cfg.Name) > 6 || strings.Trim(cfg.Name, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return nil, fmt.Errorf("libvirtns: host name %q: want 1..6 characters of [a-z0-9]", cfg.Name)
	}
	for _, p := range cfg.Private {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return nil, fmt.Errorf("libvirtns: host %s: private directory %q must be a clean absolute path other than /", cfg.Name, p)
		}
	}
	for _, tool := range Tools {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("libvirtns: host %s needs %s: %w", cfg.Name, tool, err)
		}
	}
	suffix := make([]byte, 3)
	rand.Read(suffix)
	h = &Host{Name: cfg.Name, NetNS: "nkpe2e-" + cfg.Name + "-" + hex.EncodeToString(suffix), cfg: cfg}
	if cfg.Dir == "" {
		if h.Dir, err = os.MkdirTemp("", "nkp-libvirtns-"+cfg.Name+"-"); err != nil {
			return nil, fmt.Errorf("libvirtns: host %s: %w", cfg.Name, err)
		}
	} else {
		h.Dir = cfg.Dir
		if err := os.MkdirAll(h.Dir, 0o711); err != nil {
			return nil, fmt.Errorf("libvirtns: host %s: %w", cfg.Name, err)
		}
	}
	h.URI = "qemu+unix:///system?socket=" + filepath.Join(h.Dir, "run-libvirt", "libvirt-sock")
	defer func() {
		if err != nil {
			h.Close()
			h = nil
		}
	}()
	if err := h.layout(); err != nil {
		return nil, err
	}
	if err := h.namespaces(ctx); err != nil {
		return nil, err
	}
	if err := h.startDaemons(ctx); err != nil {
		return nil, err
	}
	return h, nil
}

// layout makes the private directories: libvirt's configuration files (not the shared
// daemon's domains, networks or secrets) with this Host's own host_uuid, the QEMU
// capability cache (so libvirtd skips a slow probe), /var/lib/libvirt's skeleton with
// its owners and modes, and the hooks.
func (h *Host) layout() error {
	if err := os.Chmod(h.Dir, 0o711); err != nil {
		return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
	}
	for _, d := range libvirtDirs {
		if err := os.MkdirAll(filepath.Join(h.Dir, d.sub), 0o755); err != nil {
			return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
		}
	}
	for _, p := range h.cfg.Private {
		if err := os.MkdirAll(h.privateDir(p), 0o755); err != nil {
			return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
		}
	}
	if err := os.WriteFile(filepath.Join(h.Dir, "hosts"), hostsFile(h.Name), 0o644); err != nil {
		return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
	}
	for _, p := range h.cfg.Tmpfs {
		if !slices.Contains(h.cfg.Private, p) {
			return fmt.Errorf("libvirtns: host %s: tmpfs %q is not one of the private directories", h.Name, p)
		}
		if err := syscall.Mount("tmpfs", h.privateDir(p), "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=0755,size=256m"); err != nil {
			return fmt.Errorf("libvirtns: host %s: tmpfs on %s: %w", h.Name, p, err)
		}
		h.tmpfs = append(h.tmpfs, h.privateDir(p))
	}
	etc := filepath.Join(h.Dir, "etc-libvirt")
	confs, err := filepath.Glob("/etc/libvirt/*.conf")
	if err != nil || len(confs) == 0 {
		return fmt.Errorf("libvirtns: host %s: no /etc/libvirt/*.conf to copy (is libvirt-daemon-system installed? `make setup`)", h.Name)
	}
	for _, c := range confs {
		if err := copyFile(c, filepath.Join(etc, filepath.Base(c))); err != nil {
			return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
		}
	}
	uuid := make([]byte, 16)
	rand.Read(uuid)
	uuid[6] = uuid[6]&0x0f | 0x40
	uuid[8] = uuid[8]&0x3f | 0x80
	u := hex.EncodeToString(uuid)
	conf := fmt.Sprintf("\n# libvirtns: a host of its own, so migrations between Hosts are allowed\nhost_uuid = \"%s-%s-%s-%s-%s\"\n", u[:8], u[8:12], u[12:16], u[16:20], u[20:])
	if err := appendFile(filepath.Join(etc, "libvirtd.conf"), conf); err != nil {
		return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
	}
	// cgroups are one hierarchy for the whole machine, and libvirt names a domain's group
	// after its ID and name (machine/qemu-ID-NAME): the same VM on two Hosts (a migration)
	// would share, and then remove, one group. QEMU runs without cgroups in a Host,
	// unless Config.Cgroups asks for libvirt's default.
	cgroups := "\n# libvirtns: no cgroups (shared by every Host on the machine)\ncgroup_controllers = [ ]\n"
	if h.cfg.Cgroups {
		cgroups = "\n# libvirtns: libvirt's default cgroup placement (Config.Cgroups)\n"
	}
	if err := appendFile(filepath.Join(etc, "qemu.conf"), cgroups); err != nil {
		return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
	}
	for _, d := range []struct {
		p    string
		mode os.FileMode
	}{{"qemu", 0o755}, {"qemu/networks", 0o755}, {"hooks/qemu.d", 0o755}, {"secrets", 0o700}, {"nwfilter", 0o755}, {"storage", 0o755}} {
		if err := os.MkdirAll(filepath.Join(etc, d.p), d.mode); err != nil {
			return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
		}
	}
	for name, content := range h.cfg.Hooks {
		if err := h.InstallHook(name, content); err != nil {
			return err
		}
	}
	// The capability cache: libvirtd keys it on the QEMU binary and its own build, so a
	// copy of the shared daemon's is valid and saves a probe of several seconds.
	cache := filepath.Join(h.Dir, "cache-libvirt", "qemu", "capabilities")
	if err := os.MkdirAll(cache, 0o711); err != nil {
		return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
	}
	os.Chmod(filepath.Join(h.Dir, "cache-libvirt"), 0o711)
	os.Chmod(filepath.Join(h.Dir, "cache-libvirt", "qemu"), 0o711)
	if caps, _ := filepath.Glob("/var/cache/libvirt/qemu/capabilities/*.xml"); len(caps) > 0 {
		for _, c := range caps {
			copyFile(c, filepath.Join(cache, filepath.Base(c))) // best effort: libvirtd probes otherwise
		}
	}
	// /var/lib/libvirt's directories, two levels deep, with the packaged owners and modes
	// (qemu/ belongs to libvirt-qemu), and none of the shared daemon's files.
	lib := filepath.Join(h.Dir, "lib-libvirt")
	return filepath.WalkDir("/var/lib/libvirt", func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel("/var/lib/libvirt", p)
		if strings.Count(rel, "/") >= 2 {
			return fs.SkipDir
		}
		fi, err := os.Stat(p)
		if err != nil {
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		dst := filepath.Join(lib, rel)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
		}
		if err := os.Chown(dst, int(st.Uid), int(st.Gid)); err != nil {
			return fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
		}
		return os.Chmod(dst, fi.Mode().Perm())
	})
}

// privateDir is where the private copy of the absolute path p lives.
func (h *Host) privateDir(p string) string {
	return filepath.Join(h.Dir, "private", strings.ReplaceAll(strings.TrimPrefix(p, "/"), "/", "_"))
}

// Path returns the path, seen from outside, of the file p as processes inside the Host
// see it: p under one of the private directories maps into the work directory; any
// other path is the same inside and out.
func (h *Host) Path(p string) string {
	for _, d := range libvirtDirs {
		if p == d.path || strings.HasPrefix(p, d.path+"/") {
			return filepath.Join(h.Dir, d.sub, strings.TrimPrefix(p, d.path))
		}
	}
	for _, d := range h.cfg.Private {
		if p == d || strings.HasPrefix(p, d+"/") {
			return filepath.Join(h.privateDir(d), strings.TrimPrefix(p, d))
		}
	}
	return p
}

// InstallHook writes /etc/libvirt/hooks/qemu.d/NAME inside the Host (mode 0755). A hook
// installed after Start is seen after Reload (libvirtd looks for hooks when it starts
// and on SIGHUP).
func (h *Host) InstallHook(name string, content []byte) error {
	if name == "" || strings.ContainsAny(name, "/") {
		return fmt.Errorf("libvirtns: host %s: hook name %q", h.Name, name)
	}
	p := filepath.Join(h.Dir, "etc-libvirt", "hooks", "qemu.d", name)
	if err := atomicfile.WriteFile(p, content, 0o755); err != nil {
		return fmt.Errorf("libvirtns: host %s: hook %s: %w", h.Name, name, err)
	}
	return nil
}

// hostsFile is the Host's /etc/hosts: the machine's, and the Host's name on 127.0.1.1.
// libvirtd resolves its hostname (getaddrinfo with AI_CANONNAME) for the log header of
// every QEMU it starts; with a name no file knows, that is a DNS query, and in a Host
// with an uplink (a default route) to a resolver that does not answer it costs the
// resolver's timeouts: 10 s per `virsh start`, holding one of libvirtd's 20 workers.
func hostsFile(name string) []byte {
	b, _ := os.ReadFile("/etc/hosts") // none: only the Host's name
	if len(b) > 0 && b[len(b)-1] != '\n' {
		b = append(b, '\n')
	}
	return append(b, fmt.Sprintf("127.0.1.1 %s\n", name)...)
}

// namespaces creates the network namespace and a holder process that owns the mount
// namespace with the bind mounts in place.
func (h *Host) namespaces(ctx context.Context) error {
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", h.NetNS).CombinedOutput(); err != nil {
		return fmt.Errorf("libvirtns: host %s: ip netns add %s: %w: %s", h.Name, h.NetNS, err, bytes.TrimSpace(out))
	}
	if out, err := exec.CommandContext(ctx, "ip", "-n", h.NetNS, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return fmt.Errorf("libvirtns: host %s: loopback up: %w: %s", h.Name, err, bytes.TrimSpace(out))
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	mount := func(src, dst string) {
		fmt.Fprintf(&script, "mkdir -p %s\nmount --bind %s %s\n", shellQuote(dst), shellQuote(src), shellQuote(dst))
	}
	for _, d := range libvirtDirs {
		mount(filepath.Join(h.Dir, d.sub), d.path)
	}
	for _, p := range h.cfg.Private {
		mount(h.privateDir(p), p)
	}
	fmt.Fprintf(&script, "mount --bind %s /etc/hosts\n", shellQuote(filepath.Join(h.Dir, "hosts")))
	fmt.Fprintf(&script, "hostname %s\necho ready\nexec sleep infinity\n", shellQuote(h.Name))
	h.holder = exec.Command("nsenter", "--net=/run/netns/"+h.NetNS, "--", "unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", script.String())
	out, err := h.holder.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	h.holder.Stderr = &stderr
	if err := h.holder.Start(); err != nil {
		return fmt.Errorf("libvirtns: host %s: start the namespace holder: %w", h.Name, err)
	}
	ready := make(chan error, 1)
	go func() {
		b := make([]byte, 6)
		_, err := io.ReadFull(out, b)
		if err == nil && string(b) != "ready\n" {
			err = fmt.Errorf("unexpected %q", b)
		}
		ready <- err
		io.Copy(io.Discard, out)
	}()
	select {
	case err := <-ready:
		if err != nil {
			h.holder.Wait()
			h.holder = nil
			return fmt.Errorf("libvirtns: host %s: namespace holder: %v: %s", h.Name, err, bytes.TrimSpace(stderr.Bytes()))
		}
	case <-time.After(30 * time.Second):
		return fmt.Errorf("libvirtns: host %s: the namespace holder did not come up within 30 s: %s", h.Name, bytes.TrimSpace(stderr.Bytes()))
	}
	return nil
}

// Command returns a command that runs inside the Host's namespaces (mount, network,
// hostname). Its parent is the caller; nothing else is set.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--target", strconv.Itoa(h.holder.Process.Pid), "--mount", "--net", "--uts", "--", name}, args...)...)
}

func (h *Host) startDaemons(ctx context.Context) error {
	var err error
	if h.virtlogd, err = h.spawn("virtlogd", "-p", filepath.Join(h.Dir, "virtlogd.pid")); err != nil {
		return err
	}
	// virtlogd's socket first: libvirtd needs it for every QEMU it starts.
	sock := filepath.Join(h.Dir, "run-libvirt", "virtlogd-sock")
	if err := h.waitFor(ctx, 30*time.Second, "virtlogd's socket", func() bool { _, err := os.Stat(sock); return err == nil }, h.virtlogd); err != nil {
		return err
	}
	return h.StartLibvirtd(ctx)
}

func (h *Host) spawn(name string, args ...string) (*proc, error) {
	cmd := h.Command(context.Background(), name, args...)
	w := h.cfg.Log
	if w == nil {
		w = io.Discard
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("libvirtns: host %s: start %s: %w", h.Name, name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	return p, nil
}

func (h *Host) waitFor(ctx context.Context, timeout time.Duration, what string, cond func() bool, p *proc) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if p != nil && !p.running() {
			return fmt.Errorf("libvirtns: host %s: waiting for %s: the process exited (%v)", h.Name, what, p.cmd.ProcessState)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("libvirtns: host %s: %s not there within %v", h.Name, what, timeout)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("libvirtns: host %s: waiting for %s: %w", h.Name, what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// StartLibvirtd starts libvirtd (after StopLibvirtd) and waits until it answers.
func (h *Host) StartLibvirtd(ctx context.Context) error {
	if h.libvirtd != nil && h.libvirtd.running() {
		return fmt.Errorf("libvirtns: host %s: libvirtd already runs", h.Name)
	}
	var err error
	if h.libvirtd, err = h.spawn("libvirtd", "-p", filepath.Join(h.Dir, "libvirtd.pid")); err != nil {
		return err
	}
	return h.waitFor(ctx, 60*time.Second, "libvirtd to answer", func() bool {
		_, err := h.Virsh(ctx, "version")
		return err == nil
	}, h.libvirtd)
}

// StopLibvirtd stops libvirtd with SIGTERM (running domains keep running, as when an
// operator restarts libvirtd) and waits for it to exit.
func (h *Host) StopLibvirtd() error {
	if h.libvirtd == nil || !h.libvirtd.running() {
		return nil
	}
	h.libvirtd.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.libvirtd.done:
		return nil
	case <-time.After(30 * time.Second):
		h.libvirtd.cmd.Process.Kill()
		<-h.libvirtd.done
		return fmt.Errorf("libvirtns: host %s: libvirtd ignored SIGTERM for 30 s and was killed", h.Name)
	}
}

// Reload sends libvirtd SIGHUP, which makes it look for hook files again.
func (h *Host) Reload() error {
	if h.libvirtd == nil || !h.libvirtd.running() {
		return fmt.Errorf("libvirtns: host %s: libvirtd does not run", h.Name)
	}
	return h.libvirtd.cmd.Process.Signal(syscall.SIGHUP)
}

// VirshTimeout bounds one Virsh call: save, restore and migration of a small TCG guest
// take seconds, a loaded machine stretches that, a hung libvirtd must not hang the run.
const VirshTimeout = 3 * time.Minute

// Virsh runs virsh against this Host's libvirtd and returns its output; a failure's
// error carries virsh's message (where a hook's refusal appears).
func (h *Host) Virsh(parent context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(parent, VirshTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", h.URI}, args...)...).CombinedOutput()
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded) && !errors.Is(parent.Err(), context.DeadlineExceeded):
		err = fmt.Errorf("%w: no answer within %v (is libvirtd hung?)", ctx.Err(), VirshTimeout)
	case ctx.Err() != nil:
		err = fmt.Errorf("stopped by the caller: %w", ctx.Err()) // not libvirtd's fault
	}
	if err != nil {
		return string(out), fmt.Errorf("host %s: virsh %s: %w: %s", h.Name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// Link joins a and b with a veth pair on subnet 10.77.N.0/24 (N from 1 to 254), a at .1
// and b at .2, and sets their IP fields. Choose N per pair of Hosts that run at once.
func Link(ctx context.Context, a, b *Host, n int) error {
	if n < 1 || n > 254 {
		return fmt.Errorf("libvirtns: link %s-%s: subnet number %d out of 1..254", a.Name, b.Name, n)
	}
	// Interface names are at most 15 bytes and live briefly in the root namespace.
	suffix := make([]byte, 3)
	rand.Read(suffix)
	ia, ib := "nkpa"+hex.EncodeToString(suffix), "nkpb"+hex.EncodeToString(suffix)
	ipA, ipB := fmt.Sprintf("10.77.%d.1", n), fmt.Sprintf("10.77.%d.2", n)
	steps := [][]string{
		{"link", "add", ia, "type", "veth", "peer", "name", ib},
		{"link", "set", ia, "netns", a.NetNS},
		{"link", "set", ib, "netns", b.NetNS},
		{"-n", a.NetNS, "addr", "add", ipA + "/24", "dev", ia},
		{"-n", b.NetNS, "addr", "add", ipB + "/24", "dev", ib},
		{"-n", a.NetNS, "link", "set", ia, "up"},
		{"-n", b.NetNS, "link", "set", ib, "up"},
	}
	for i, s := range steps {
		if out, err := exec.CommandContext(ctx, "ip", s...).CombinedOutput(); err != nil {
			if i > 0 {
				exec.Command("ip", "link", "del", ia).Run() // still in the root namespace when step 2 failed
			}
			return fmt.Errorf("libvirtns: link %s-%s: ip %s: %w: %s", a.Name, b.Name, strings.Join(s, " "), err, bytes.TrimSpace(out))
		}
	}
	a.IP, b.IP = ipA, ipB
	return nil
}

// Uplink joins h to the root network namespace with a veth pair on subnet 10.78.N.0/24
// (N from 1 to 254): the root side is 10.78.N.1 (h.Gateway), h's side 10.78.N.2, and h's
// default route goes through it. Every address of the root namespace is then reachable
// from h, so a server listening on one Host's Gateway serves all Hosts with an uplink.
// The root namespace is shared by every test process on the machine: when another
// uplink holds subnet N already (the same test run twice at once), the next free one is
// taken (under a lock file), since two veths on one subnet send replies to the wrong
// Host and connections to the Gateway hang.
func Uplink(ctx context.Context, h *Host, n int) error {
	if n < 1 || n > 254 {
		return fmt.Errorf("libvirtns: uplink %s: subnet number %d out of 1..254", h.Name, n)
	}
	lock, err := os.OpenFile(filepath.Join(os.TempDir(), "nkp-libvirtns-uplink.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("libvirtns: uplink %s: %w", h.Name, err)
	}
	defer lock.Close() // releases the lock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("libvirtns: uplink %s: locking %s: %w", h.Name, lock.Name(), err)
	}
	if n, err = freeUplinkSubnet(n); err != nil {
		return fmt.Errorf("libvirtns: uplink %s: %w", h.Name, err)
	}
	suffix := make([]byte, 3)
	rand.Read(suffix)
	ir, ih := "nkpr"+hex.EncodeToString(suffix), "nkph"+hex.EncodeToString(suffix)
	gw, ip := fmt.Sprintf("10.78.%d.1", n), fmt.Sprintf("10.78.%d.2", n)
	steps := [][]string{
		{"link", "add", ir, "type", "veth", "peer", "name", ih},
		{"link", "set", ih, "netns", h.NetNS},
		{"addr", "add", gw + "/24", "dev", ir},
		{"-n", h.NetNS, "addr", "add", ip + "/24", "dev", ih},
		{"link", "set", ir, "up"},
		{"-n", h.NetNS, "link", "set", ih, "up"},
		{"-n", h.NetNS, "route", "add", "default", "via", gw},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, "ip", s...).CombinedOutput(); err != nil {
			exec.Command("ip", "link", "del", ir).Run()
			return fmt.Errorf("libvirtns: uplink %s: ip %s: %w: %s", h.Name, strings.Join(s, " "), err, bytes.TrimSpace(out))
		}
	}
	h.Gateway = gw
	return nil
}

// freeUplinkSubnet returns the first subnet number from n on (wrapping within 1..254)
// whose 10.78.N.0/24 no address of the root namespace is in.
func freeUplinkSubnet(n int) (int, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return 0, fmt.Errorf("listing the root namespace's addresses: %w", err)
	}
	used := map[int]bool{}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip4 := ipn.IP.To4(); ip4 != nil && ip4[0] == 10 && ip4[1] == 78 {
				used[int(ip4[2])] = true
			}
		}
	}
	for i := range 254 {
		if c := (n-1+i)%254 + 1; !used[c] {
			return c, nil
		}
	}
	return 0, errors.New("every subnet 10.78.1-254.0/24 is in use in the root namespace (uplinks left by killed tests? ip link del the nkpr* links)")
}

// Pids returns the processes in the Host's network namespace: libvirtd, virtlogd, the
// QEMUs and their vTPMs, and anything started with Command.
func (h *Host) Pids() ([]int, error) {
	if h.holder == nil || h.holder.Process == nil {
		return nil, nil
	}
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", h.holder.Process.Pid))
	if err != nil {
		return nil, fmt.Errorf("libvirtns: host %s: %w", h.Name, err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil && l == ns {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// Close destroys the Host's domains, kills every process in its namespaces, deletes the
// network namespace and removes the work directory. It is safe to call twice.
func (h *Host) Close() error {
	if h.closed {
		return nil
	}
	h.closed = true
	var errs []error
	if h.libvirtd != nil && h.libvirtd.running() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if out, err := h.Virsh(ctx, "list", "--name"); err == nil {
			for _, d := range strings.Fields(out) {
				h.Virsh(ctx, "destroy", d)
			}
		}
		cancel()
	}
	// Kill the namespace's processes; our own children (holder, daemons) are reaped by
	// their goroutines, the rest (QEMU) by init. Repeat while new ones appear.
	for range 5 {
		pids, err := h.Pids()
		if err != nil || len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		waitGone(pids, 10*time.Second)
	}
	var wg sync.WaitGroup
	for _, p := range []*proc{h.libvirtd, h.virtlogd} {
		if p != nil {
			wg.Add(1)
			go func() { defer wg.Done(); p.cmd.Process.Kill(); <-p.done }()
		}
	}
	wg.Wait()
	if h.holder != nil && h.holder.Process != nil {
		h.holder.Process.Kill()
		h.holder.Wait()
	}
	if h.NetNS != "" {
		if out, err := exec.Command("ip", "netns", "del", h.NetNS).CombinedOutput(); err != nil && !bytes.Contains(out, []byte("No such file")) {
			errs = append(errs, fmt.Errorf("libvirtns: host %s: ip netns del %s: %w: %s", h.Name, h.NetNS, err, bytes.TrimSpace(out)))
		}
	}
	for _, m := range h.tmpfs {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("libvirtns: host %s: unmount %s: %w", h.Name, m, err))
		}
	}
	if h.Dir != "" {
		if err := os.RemoveAll(h.Dir); err != nil {
			errs = append(errs, fmt.Errorf("libvirtns: host %s: %w", h.Name, err))
		}
	}
	return errors.Join(errs...)
}

// waitGone waits until none of pids runs (gone or a zombie), up to timeout.
func waitGone(pids []int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		alive := false
		for _, pid := range pids {
			if Alive(pid) {
				alive = true
				break
			}
		}
		if !alive {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Alive reports whether pid runs and is not a zombie (this machine's PID 1 may not reap,
// so kill -0 is not enough).
func Alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	fi, err := os.Stat(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, fi.Mode().Perm())
}

func appendFile(p, s string) error {
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(s)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// RemoveStale deletes the network namespaces of Hosts whose run ended without Close (a
// test binary killed by its timeout): nkpe2e-* namespaces older than ten minutes in
// which no process runs. A Host in use has its holder process inside (and one being
// created is younger), so it is left alone.
func RemoveStale() error {
	ents, err := os.ReadDir("/run/netns")
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("libvirtns: %w", err)
	}
	var errs []error
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "nkpe2e-") {
			continue
		}
		if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < 10*time.Minute {
			continue
		}
		out, err := exec.Command("ip", "netns", "pids", e.Name()).Output()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", e.Name()).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("libvirtns: stale namespace %s: %w: %s", e.Name(), err, bytes.TrimSpace(out)))
		}
	}
	return errors.Join(errs...)
}
