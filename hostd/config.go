package hostd

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Defaults of Config.
const (
	DefaultStateDir = "/var/lib/nkp/hostd"
	DefaultRunDir   = "/run/nkp"
	DefaultVTPMUser = "tss"
	// SwtpmSetupNone as Config.SwtpmSetup: new vTPMs are not manufactured by swtpm_setup.
	SwtpmSetupNone      = "none"
	DefaultQEMUUser     = "libvirt-qemu"
	DefaultLibvirtURI   = "qemu:///system"
	DefaultSyncInterval = time.Minute
	DefaultHookTimeout  = 25 * time.Second
	// TPMNone is the Config.TPM value of a host without a TPM: KDKs in memory only.
	TPMNone = "none"
)

// Config configures a host daemon. The zero value of every field means its default;
// Validate fills them in and names the first bad one.
type Config struct {
	// StateDir holds the host's identity (host.json, host.key 0600, host.crt, ca.crt),
	// the KDK cache (kdk/, TPM import blobs only) and the vTPM states (vtpm/). 0711: the
	// vTPM user traverses it to its own state directories.
	StateDir string
	// RunDir holds the sockets: hook.sock, hostd.sock (both root-only) and vtpm/.
	RunDir string
	// HookSocket is where nkp-hook asks (default RunDir/hook.sock).
	HookSocket string
	// APISocket is the local API (default RunDir/hostd.sock).
	APISocket string
	// TPM is the host TPM: "" for /dev/tpmrm0, a device path, swtpm:path=SOCK[,ctrl=SOCK],
	// or TPMNone. Must be what the host joined with.
	TPM string
	// OpenTPM, if set, opens the host TPM instead of TPM (tests: the go-tpm-tools
	// simulator). It returns the TPM as an io.ReadWriter and its closer.
	OpenTPM func() (io.ReadWriter, io.Closer, error)
	// SwtpmBinary is nkp-swtpm (default: next to this executable, else found in PATH).
	SwtpmBinary string
	// SwtpmSetup is swtpm_setup, which manufactures each new vTPM that protect creates as
	// libvirt would (EK and platform certificates, PCR banks): "" is swtpm_setup from
	// PATH (Debian's swtpm-tools); SwtpmSetupNone leaves new vTPMs to libtpms' defaults
	// (all PCR banks, no EK certificate).
	SwtpmSetup string
	// VTPMUser runs nkp-swtpm; QEMUUser owns the vTPM sockets.
	VTPMUser, QEMUUser string
	// LibvirtURI is libvirt's connection for lifecycle events and VM operations; "-"
	// runs without libvirt (hook path only: tests).
	LibvirtURI string
	// SyncInterval is how often the provider is asked for KDK changes, revocation and
	// certificate renewal.
	SyncInterval time.Duration
	// RenewBefore renews the host certificate when less than this is left of it; 0
	// means a third of its lifetime.
	RenewBefore time.Duration
	// HookTimeout bounds the handling of one hook call (the hook itself waits 30 s).
	HookTimeout time.Duration
	// Log receives the daemon's log; nil discards.
	Log *slog.Logger
	// Registry receives the metrics; nil makes a new one (served on /metrics either way).
	Registry *prometheus.Registry
	// Now is the clock (tests); nil is time.Now.
	Now func() time.Time

	vtpmCred, qemuCred cred
}

type cred struct{ uid, gid int }

// Validate fills in defaults and checks the configuration.
func (c *Config) Validate() error {
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.RunDir == "" {
		c.RunDir = DefaultRunDir
	}
	if c.HookSocket == "" {
		c.HookSocket = filepath.Join(c.RunDir, "hook.sock")
	}
	if c.APISocket == "" {
		c.APISocket = filepath.Join(c.RunDir, "hostd.sock")
	}
	for _, f := range []struct{ flag, v string }{{"--state-dir", c.StateDir}, {"--run-dir", c.RunDir}, {"--hook-socket", c.HookSocket}, {"--socket", c.APISocket}} {
		if !filepath.IsAbs(f.v) {
			return fmt.Errorf("%s %q: want an absolute path", f.flag, f.v)
		}
	}
	if c.VTPMUser == "" {
		c.VTPMUser = DefaultVTPMUser
	}
	if c.QEMUUser == "" {
		c.QEMUUser = DefaultQEMUUser
	}
	var err error
	if c.vtpmCred, err = lookupUser(c.VTPMUser); err != nil {
		return fmt.Errorf("--vtpm-user: %w", err)
	}
	if c.vtpmCred.uid == 0 {
		return fmt.Errorf("--vtpm-user %s: nkp-swtpm must not run as root; name an unprivileged user such as tss", c.VTPMUser)
	}
	if c.qemuCred, err = lookupUser(c.QEMUUser); err != nil {
		return fmt.Errorf("--qemu-user: %w (the user QEMU runs as: libvirt-qemu on Debian, qemu on Fedora)", err)
	}
	if c.SwtpmBinary == "" {
		c.SwtpmBinary = findSwtpm()
	}
	if fi, err := os.Stat(c.SwtpmBinary); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("--swtpm %q: not an executable (build it with `make build`, or name nkp-swtpm's path)", c.SwtpmBinary)
	}
	if c.LibvirtURI == "" {
		c.LibvirtURI = DefaultLibvirtURI
	}
	if c.SyncInterval == 0 {
		c.SyncInterval = DefaultSyncInterval
	}
	if c.SyncInterval < 0 || c.RenewBefore < 0 || c.HookTimeout < 0 {
		return errors.New("--sync-interval, --renew-before and --hook-timeout must not be negative")
	}
	if c.HookTimeout == 0 {
		c.HookTimeout = DefaultHookTimeout
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

func lookupUser(name string) (cred, error) {
	u, err := user.Lookup(name)
	if err != nil {
		u, err = user.LookupId(name)
	}
	if err != nil {
		return cred{}, fmt.Errorf("no user %q on this host", name)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return cred{uid, gid}, nil
}

// findSwtpm looks for nkp-swtpm next to the running executable, then in PATH.
func findSwtpm() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "nkp-swtpm")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(dir, "nkp-swtpm")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/usr/bin/nkp-swtpm"
}
