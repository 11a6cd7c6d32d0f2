package vm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/swtpm/state"
)

// SwtpmSetup says how protect manufactures a new vTPM: with swtpm_setup (Debian's
// swtpm-tools) driving nkp-swtpm, as libvirt does for its own swtpm at a new TPM's first
// start, so that the guest sees the same TPM (an RSA and an ECC EK with their
// certificates from swtpm_setup.conf's create_certs_tool, a platform certificate, the NV
// indices locked, the PCR banks of <active_pcr_banks> or swtpm_setup's default sha256).
type SwtpmSetup struct {
	// Program is swtpm_setup ("swtpm_setup" from PATH if empty).
	Program string
	// VTPM is nkp-swtpm, which swtpm_setup runs as its TPM (`--tpm "VTPM socket"`).
	VTPM string
	// Config is swtpm_setup's configuration file; "" leaves it to swtpm_setup (the vTPM
	// user's ~/.config/swtpm_setup.conf, else /etc/swtpm_setup.conf), as libvirt does.
	Config string
	// Timeout bounds one run (default 2 minutes).
	Timeout time.Duration
}

// setupParams are the inputs of one swtpm_setup run.
type setupParams struct {
	Program, VTPM, Config string
	StateDir, LogFile     string
	VMName, VMUUID        string
	Banks                 []string // nil or empty: swtpm_setup's default
	KeyFD                 int      // the state key (hex) on this fd of the child
}

// setupArgs is swtpm_setup's command line: libvirt's (qemuTPMEmulatorRunSetup, libvirt
// 9.0) with nkp-swtpm as the TPM and the state key on an fd (--keyfile-fd, AES-256-CBC:
// the only modes swtpm_setup knows; the state is re-encrypted under nkp's key after).
func setupArgs(p setupParams) []string {
	prog := p.Program
	if prog == "" {
		prog = "swtpm_setup"
	}
	args := []string{prog, "--tpm2", "--tpm", p.VTPM + " socket", "--tpmstate", p.StateDir,
		"--vmid", p.VMName + ":" + p.VMUUID, "--logfile", p.LogFile,
		"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite",
		"--keyfile-fd", fmt.Sprint(p.KeyFD), "--cipher", "aes-256-cbc"}
	if len(p.Banks) > 0 {
		args = append(args, "--pcr-banks", strings.Join(p.Banks, ","))
	}
	if p.Config != "" {
		args = append(args, "--config", p.Config)
	}
	return args
}

// manufacture runs swtpm_setup for VM d's new vTPM in a staging directory beside its
// state directories (VTPMDir/<uuid>/.setup-<random>, the vTPM user's, 0700), as the vTPM
// user, with a random one-time key on a pipe, reads the blobs it made and removes the
// staging directory. The caller writes them as nkp's state under the vTPM's key.
// Nothing else changes: a failure leaves the domain as it was.
func (m *Manager) manufacture(ctx context.Context, d *domxml.Domain, banks []string) (map[string][]byte, error) {
	st := m.cfg.Setup
	prog := st.Program
	if prog == "" {
		prog = "swtpm_setup"
	}
	if _, err := exec.LookPath(prog); err != nil {
		return nil, fmt.Errorf("vm %q: %w: cannot manufacture its new vTPM as libvirt would (EK and platform certificates): %s is not installed (%v): install Debian's swtpm-tools (apt-get install swtpm-tools), which libvirt needs for its own vTPMs too, and run the command again; nothing was changed", d.Name, ErrUnavailable, prog, err)
	}
	timeout := st.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	parent := filepath.Join(m.cfg.VTPMDir, d.UUID)
	if err := os.MkdirAll(parent, 0o711); err != nil {
		return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: %w", d.Name, err)
	}
	if m.cfg.VTPMOwner != nil {
		if err := rootParent(parent); err != nil {
			return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: %w", d.Name, err)
		}
	}
	// A staging directory a killed hostd left is removed by Recover, which runs at
	// hostd's start before any operation.
	var r [8]byte
	rand.Read(r[:])
	dir := filepath.Join(parent, ".setup-"+hex.EncodeToString(r[:]))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: %w", d.Name, err)
	}
	defer os.RemoveAll(dir)
	if m.cfg.VTPMOwner != nil {
		if err := os.Lchown(dir, m.cfg.VTPMOwner.UID, m.cfg.VTPMOwner.GID); err != nil {
			return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: %w", d.Name, err)
		}
	}

	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: random key: %w", d.Name, err)
	}
	key, err := state.NewKey(raw)
	clear(raw)
	if err != nil {
		return nil, err
	}
	defer key.Wipe()
	kr, kw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: %w", d.Name, err)
	}
	defer kr.Close()
	hx := []byte(hex.EncodeToString(key.Bytes()))
	_, werr := kw.Write(hx) // 64 bytes: far below a pipe's capacity
	clear(hx)
	kw.Close()
	if werr != nil {
		return nil, fmt.Errorf("vm %q: manufacturing its new vTPM: key pipe: %w", d.Name, werr)
	}

	logFile := filepath.Join(dir, "setup.log")
	argv := setupArgs(setupParams{Program: prog, VTPM: st.VTPM, Config: st.Config, StateDir: dir, LogFile: logFile,
		VMName: d.Name, VMUUID: d.UUID, Banks: banks, KeyFD: 3})
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, argv[0], argv[1:]...)
	cmd.ExtraFiles = []*os.File{kr} // fd 3
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if m.cfg.VTPMOwner != nil && os.Geteuid() == 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(m.cfg.VTPMOwner.UID), Gid: uint32(m.cfg.VTPMOwner.GID), Groups: []uint32{}}
	}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) } // nkp-swtpm and the cert tool too
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Run(); err != nil {
		log, _ := os.ReadFile(logFile)
		if cctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("%w (no answer within %v)", err, timeout)
		}
		return nil, fmt.Errorf("vm %q: %w: manufacturing its new vTPM with %s (libvirt's arguments; certificates by the create_certs_tool of swtpm_setup.conf, swtpm_localca) failed: %v: %s; nothing was changed: fix what it says (swtpm_setup and swtpm_localca come with Debian's swtpm-tools; swtpm_localca keeps its CA in /var/lib/swtpm-localca, which the vTPM user must own) and run the command again", d.Name, ErrUnavailable, prog, err, lastLines(out.String()+"\n"+string(log), 6))
	}
	m.log.Info("vm: new vTPM manufactured by swtpm_setup", "vm", d.Name, "banks", strings.Join(banks, ","), "took", time.Since(start).Round(time.Millisecond))
	src, err := m.openSource(dir, key)
	if err != nil {
		return nil, fmt.Errorf("vm %q: reading the vTPM state swtpm_setup made in %s: %w; nothing was changed", d.Name, dir, err)
	}
	defer src.close(false)
	blobs := map[string][]byte{}
	for n, b := range src.blobs {
		blobs[n] = bytes.Clone(b)
	}
	if len(blobs) == 0 {
		return nil, fmt.Errorf("vm %q: %w: swtpm_setup left no vTPM state in %s; nothing was changed", d.Name, ErrUnavailable, dir)
	}
	return blobs, nil
}

// lastLines returns the last n non-empty lines of s, joined by " | ".
func lastLines(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	if len(lines) == 0 {
		return "no output"
	}
	return strings.Join(lines, " | ")
}
