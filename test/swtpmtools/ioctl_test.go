package swtpmtools

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

func netDial(path string) (net.Conn, error) { return net.DialTimeout("unix", path, time.Second) }

// qemuMinCaps is the control channel capability mask QEMU needs for a TPM 2.0
// (specs/swtpm-protocol.md §1.3), plus GET/SET_STATEBLOB so migration is not blocked.
const qemuMinCaps = 0x348f | 1<<8 | 1<<9

// TestSwtpmIoctl walks a backend through every swtpm_ioctl command and swtpm_bios,
// checking what each prints and what the TPM does afterwards.
func TestSwtpmIoctl(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "swtpm_bios", "tpm2_getrandom")
	forEachBackend(t, func(t *testing.T, be backend) {
		state := t.TempDir()
		p := start(t, be, procOpts{stateDir: state})
		ioctl := func(args ...string) (string, error) {
			return runTool(t, nil, "swtpm_ioctl", append([]string{"--unix", p.Ctrl}, args...)...)
		}
		mustIoctl := func(args ...string) string {
			t.Helper()
			out, err := ioctl(args...)
			if err != nil {
				t.Fatalf("swtpm_ioctl %s: %v\n%s\nlog: %s", strings.Join(args, " "), err, out, p.logText())
			}
			return out
		}
		tcti := []string{"TPM2TOOLS_TCTI=swtpm:path=" + p.Data}

		// -c: the capability mask holds what QEMU needs.
		out := mustIoctl("-c")
		m := regexp.MustCompile(`ptm capability is 0x([0-9a-fA-F]+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("-c printed %q, want \"ptm capability is 0x...\"", out)
		}
		caps, _ := strconv.ParseUint(m[1], 16, 64)
		if caps&qemuMinCaps != qemuMinCaps {
			t.Errorf("capabilities %#x lack %#x that QEMU needs", caps, qemuMinCaps&^caps)
		}

		// Before INIT the data channel answers with a TPM error.
		if out, err := runTool(t, tcti, "tpm2_getrandom", "--hex", "8"); err == nil {
			t.Errorf("tpm2_getrandom before INIT succeeded: %s", out)
		}

		// -i, then swtpm_bios: TPM2_Startup(CLEAR) and TPM2_IncrementalSelfTest.
		mustIoctl("-i")
		if out, err := runTool(t, nil, "swtpm_bios", "--tpm2", "--unix", p.Data, "-cs"); err != nil {
			t.Fatalf("swtpm_bios --tpm2 -cs: %v\n%s\nlog: %s", err, out, p.logText())
		}
		if got := mustRun(t, tcti, "tpm2_getrandom", "--hex", "16"); !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(strings.TrimSpace(got)) {
			t.Errorf("tpm2_getrandom --hex 16 = %q, want 32 hex digits", got)
		}
		// swtpm_bios -o again: a second Startup is refused by the TPM (0x100), proving
		// the first one reached it.
		if out, err := runTool(t, nil, "swtpm_bios", "--tpm2", "--unix", p.Data, "-o"); err == nil {
			t.Errorf("second TPM2_Startup accepted: %s", out)
		}

		// -e, -h, -r: the established bit goes 0 -> 1 (HASH_END) -> 0 (reset at locality 3).
		established := func() string {
			t.Helper()
			return strings.TrimSpace(mustIoctl("-e"))
		}
		if got := established(); got != "tpmEstablished is 0" {
			t.Errorf("-e = %q, want tpmEstablished is 0", got)
		}
		mustIoctl("-h", "measured by a dynamic root of trust")
		if got := established(); got != "tpmEstablished is 1" {
			t.Errorf("-e after -h = %q, want tpmEstablished is 1", got)
		}
		if out, err := ioctl("-r", "0"); err == nil {
			t.Errorf("-r 0 (locality 0) succeeded: %s; a TPM 2 resets the bit from locality 3 or 4 only", out)
		}
		mustIoctl("-r", "3")
		if got := established(); got != "tpmEstablished is 0" {
			t.Errorf("-e after -r 3 = %q, want tpmEstablished is 0", got)
		}

		// -l: localities 0..4 are accepted, 5 is not.
		mustIoctl("-l", "4")
		mustIoctl("-l", "0")
		if out, err := ioctl("-l", "5"); err == nil {
			t.Errorf("-l 5 succeeded: %s", out)
		}

		// --info 1: TPM specification JSON; -g config flags; -b 0 buffer size query; -C.
		if out := mustIoctl("--info", "1"); !strings.Contains(out, `"TPMSpecification"`) {
			t.Errorf("--info 1 = %q, want the TPMSpecification JSON", out)
		}
		if out := mustIoctl("-g"); !strings.Contains(out, "ptm configuration flags: 0x0") {
			t.Errorf("-g = %q, want flags 0x0 (no keys)", out)
		}
		if out := mustIoctl("-b", "0"); !strings.Contains(out, "TPM buffersize") {
			t.Errorf("-b 0 = %q, want the buffer sizes", out)
		}
		mustIoctl("-C")

		// -v stores the volatile state; --save gets both blobs from the running TPM.
		mustIoctl("-v")
		dir := t.TempDir()
		perm, vol := filepath.Join(dir, "perm"), filepath.Join(dir, "vol")
		mustIoctl("--save", "permanent", perm)
		mustIoctl("--save", "volatile", vol)
		for _, f := range []string{perm, vol} {
			if fi, err := os.Stat(f); err != nil || fi.Size() < 100 {
				t.Fatalf("--save wrote %s: %v (size %v)", f, err, fi)
			}
		}

		// --stop: the data channel fails; --load needs a stopped TPM and, with -i,
		// resumes the saved TPM without a new TPM2_Startup.
		mustIoctl("--stop")
		if out, err := runTool(t, tcti, "tpm2_getrandom", "--hex", "8"); err == nil {
			t.Errorf("tpm2_getrandom after --stop succeeded: %s", out)
		}
		mustIoctl("--load", "permanent", perm)
		mustIoctl("--load", "volatile", vol)
		mustIoctl("-i")
		mustRun(t, tcti, "tpm2_getrandom", "--hex", "8")

		// -s: SHUTDOWN ends the process with status 0.
		mustIoctl("-s")
		if err := p.Wait(10 * time.Second); err != nil {
			t.Errorf("exit after -s: %v; log: %s", err, p.logText())
		}
	})
}

// TestTCPChannels drives a backend whose control and data channels are TCP sockets
// with swtpm_ioctl --tcp and swtpm_bios --tcp, as in swtpm's own examples.
func TestTCPChannels(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "swtpm_bios", "tpm2_getrandom")
	forEachBackend(t, func(t *testing.T, be backend) {
		p := start(t, be, procOpts{stateDir: t.TempDir(), tcp: true})
		ctrl := "127.0.0.1:" + strconv.Itoa(p.TCPPort+1)
		data := "127.0.0.1:" + strconv.Itoa(p.TCPPort)
		mustRun(t, nil, "swtpm_ioctl", "--tcp", ctrl, "-i")
		mustRun(t, nil, "swtpm_bios", "--tpm2", "--tcp", data)
		mustRun(t, p.TCTI(), "tpm2_getrandom", "--hex", "8")
		if out := mustRun(t, nil, "swtpm_ioctl", "--tcp", ctrl, "-e"); !strings.Contains(out, "tpmEstablished is 0") {
			t.Errorf("swtpm_ioctl --tcp -e = %q", out)
		}
		mustRun(t, nil, "swtpm_ioctl", "--tcp", ctrl, "-s")
		if err := p.Wait(10 * time.Second); err != nil {
			t.Errorf("exit after -s: %v", err)
		}
	})
}

// TestDataOnly runs a backend without --ctrl, as swtpm allows: the TPM is served on
// the data socket alone, swtpm_bios starts it (and a second TPM2_Startup is refused),
// and SIGTERM ends it with exit status 0 and its state written. The pid file holds the
// pid's digits and nothing else, as swtpm writes it.
func TestDataOnly(t *testing.T) {
	e2e.Require(t, "swtpm_bios")
	forEachBackend(t, func(t *testing.T, be backend) {
		state, dir := t.TempDir(), sockDir(t)
		pidf := filepath.Join(dir, "pid")
		p := startNoWait(t, be, procOpts{stateDir: state, dir: dir, noCtrl: true,
			extra: []string{"--pid", "file=" + pidf, "--flags", "not-need-init"}})
		// nkp-swtpm writes the pid file once the TPM started (swtpm 0.7.1 before).
		e2e.WaitFor(t, 10*time.Second, "the data socket and the pid file", func() bool {
			fi, err := os.Stat(pidf)
			return dialable(p.Data) && err == nil && fi.Size() > 0
		})
		if b, err := os.ReadFile(pidf); err != nil || string(b) != strconv.Itoa(p.pid()) {
			t.Errorf("pid file holds %q (%v), want %q", b, err, strconv.Itoa(p.pid()))
		}
		mustRun(t, nil, "swtpm_bios", "--tpm2", "--unix", p.Data)
		if out, err := runTool(t, nil, "swtpm_bios", "--tpm2", "--unix", p.Data); err == nil {
			t.Errorf("a second swtpm_bios (TPM2_Startup) succeeded: %s", out)
		}
		// Stop sends SIGTERM and waits 10 s; it errs on a non-zero exit or a kill.
		if err := p.proc.Stop(10 * time.Second); err != nil {
			t.Errorf("%s after SIGTERM: %v; log: %s", be.name, err, p.logText())
		}
		if _, err := os.Stat(filepath.Join(state, "tpm2-00.permall")); err != nil {
			t.Errorf("no permanent state after SIGTERM: %v", err)
		}
	})
}
