package vtpm

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/guest/guesttest"
)

// Where libvirt 9.0 (Debian's build) keeps what it makes for <backend type='emulator'>.
const (
	libvirtSwtpmStorage = "/var/lib/libvirt/swtpm"        // <uuid>/tpm2: the state
	libvirtSwtpmLogs    = "/var/log/swtpm/libvirt/qemu"   // <name>-swtpm.log: swtpm_setup and swtpm
	swtpmLocalCA        = "/var/lib/swtpm-localca"        // swtpm_localca's CA, used as swtpm_user
	libvirtQEMUConf     = "/etc/libvirt/qemu.conf"        // swtpm_user (default tss)
	overrideMark        = "nkp-emulator-swtpm-"           // in the path of the bind-mounted copy
	emulatorPrefix      = "nkp-emu-"                      // names of this test's domains and secrets
	overrideLockFile    = "/run/lock/nkp-test-swtpm.lock" // one override at a time on this host
)

// nkpStateMagic starts every state file nkp-swtpm writes with a key (swtpm/state/format.go).
const nkpStateMagic = "NKPSTATE"

// TestLibvirtEmulator runs nkp-swtpm as the swtpm that libvirt itself starts
// (<backend type='emulator'> with <encryption secret=…>): for the test, a copy of
// nkp-swtpm is bind-mounted over the swtpm that libvirtd finds in its PATH, only while a
// libvirt call that starts swtpm runs (start, restore), so that other users of
// /usr/bin/swtpm on this host see Debian's swtpm the rest of the time. Each case is one
// domain's life: emulatorLifecycle, emulatorTakeOver and emulatorBackToSwtpm.
func TestLibvirtEmulator(t *testing.T) {
	a := guesttest.Require(t)
	requireLibvirt(t)
	e2e.Require(t, "swtpm", "swtpm_setup", "swtpm_ioctl", "swtpm_localca")
	bin, ok := nkpSwtpm(t)
	if !ok {
		t.Skip("nkp-swtpm unavailable (see the log above)")
	}
	env := emulatorEnv{a: a, tss: swtpmUser(t)}
	env.ov = newSwtpmOverride(t, bin) // takes the host-wide lock first
	removeStaleDomains(t)
	prepareLocalCA(t, env.tss)
	tests := []struct {
		name string
		run  func(t *testing.T, env emulatorEnv)
	}{
		{"nkp-swtpm-from-the-first-start", emulatorLifecycle},
		{"swtpm-state-taken-over", emulatorTakeOver},
		{"back-to-swtpm-by-save-restore", emulatorBackToSwtpm},
		{"wrong-secret-refused", emulatorWrongSecret},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.run(t, env) })
	}
}

// emulatorEnv is what every case of TestLibvirtEmulator shares.
type emulatorEnv struct {
	a   guest.Artifacts
	ov  *swtpmOverride
	tss *user.User // libvirt's swtpm_user
}

// emulatorLifecycle: a domain whose vTPM is nkp-swtpm from its first start. It checks
// that the TPM process libvirt started is nkp-swtpm running as swtpm_user with no secret
// in its argv or log; that swtpm_setup provisioned the EK and its certificate through
// nkp-swtpm; that the state libvirt keeps is nkp's encrypted format, mode 0600, without
// the guest's NV value in plaintext; that `virsh save` + `virsh restore` keeps PCR16 and
// NV (GET/SET_STATEBLOB under the migration key); that NV survives `virsh destroy` +
// `virsh start`; and that `virsh undefine --tpm` removes the state.
func emulatorLifecycle(t *testing.T, env emulatorEnv) {
	vm := newEmulatorVM(t, env.a)
	value := "emu-" + randHex(t, 6)

	// Boot 1: swtpm_setup manufactures the TPM through nkp-swtpm, the guest writes NV,
	// extends PCR16 and loops.
	vm.define(t, "console1.log", loopConfig(value, "before-save"))
	if _, err := os.Stat(vm.storage()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("state %s exists before the first start (stat: %v): a leftover of another domain with this UUID?", vm.storage(), err)
	}
	pid := vm.runNKP(t, env, "start", vm.name)
	recs := vm.waitFirstLoop(t)
	if v, _ := guest.Last(recs, "nvwrite"); v != "ok" {
		t.Errorf("guest nvwrite = %q, want ok", v)
	}
	vm.checkSetupLog(t, pid)
	// The state as swtpm_setup left it and nkp-swtpm then wrote it in place (the guest's
	// NV write): the mode must be libvirt's 0600 already, not swtpm_setup's 0640.
	vm.checkState(t, env.tss, value)
	before := lastValues(recs, "pcr0", "pcr16")
	before["nv"] = value

	// virsh save + restore: the state blobs travel in the save image, encrypted with
	// the migration key, into a new nkp-swtpm process on the same state directory.
	image, lastLoop := vm.save(t)
	vm.checkSavedTPMBlob(t, image)
	vm.runNKP(t, env, "restore", image)
	checkKept(t, "virsh restore", vm.console.waitLoopAfter(t, lastLoop, vm.stopped), before)

	// virsh destroy (power cut, no TPM2_Shutdown) + virsh start with a guest that only
	// reads NV: the value must come from the state nkp-swtpm stored under libvirt.
	vm.destroyForNVRead(t)
	vm.checkState(t, env.tss, value)
	vm.runNKP(t, env, "start", vm.name)
	checkKept(t, "virsh destroy + start", vm.waitDone(t), map[string]string{"nv": value})
	vm.waitPowerOff(t)

	// virsh undefine --tpm removes the state directory libvirt made.
	if _, err := os.Stat(vm.storage()); err != nil {
		t.Fatalf("state before undefine: %v", err)
	}
	vm.virsh(t, "undefine", vm.name, "--tpm")
	if _, err := os.Stat(filepath.Dir(vm.storage())); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("virsh undefine --tpm left %s (stat: %v)", filepath.Dir(vm.storage()), err)
	}
}

// emulatorTakeOver: a domain whose vTPM state Debian's swtpm made (swtpm_setup, an NV
// write by the guest, encrypted with the secret's passphrase) boots with nkp-swtpm in
// its place: the guest reads its NV value, and nkp-swtpm has rewritten the state in its
// own encrypted format, mode 0600.
func emulatorTakeOver(t *testing.T, env emulatorEnv) {
	vm := newEmulatorVM(t, env.a)
	value := "swtpm-" + randHex(t, 6)

	vm.define(t, "console1.log", guest.Config{Actions: []string{guest.ActionNVWrite}, NV: value})
	vm.runDebian(t, env, "start", vm.name)
	if v, _ := guest.Last(vm.waitDone(t), "nvwrite"); v != "ok" {
		t.Fatalf("guest nvwrite under Debian's swtpm = %q, want ok", v)
	}
	vm.waitPowerOff(t)
	b, err := os.ReadFile(filepath.Join(vm.storage(), "tpm2-00.permall"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.HasPrefix(b, []byte(nkpStateMagic)) {
		t.Fatalf("Debian's swtpm left a state in nkp's format: the test did not run swtpm")
	}

	vm.define(t, "console2.log", guest.Config{Actions: []string{guest.ActionNVRead}})
	vm.runNKP(t, env, "start", vm.name)
	checkKept(t, "nkp-swtpm's start on swtpm's state", vm.waitDone(t), map[string]string{"nv": value})
	vm.waitPowerOff(t)
	vm.checkState(t, env.tss, value)
}

// emulatorBackToSwtpm: the way back from nkp-swtpm to Debian's swtpm for a domain whose
// state nkp-swtpm encrypted in its own format, which swtpm cannot read: `virsh save`
// under nkp-swtpm, `virsh restore` under Debian's swtpm (the state blobs in the image
// keep swtpm's envelope), then the domain keeps its PCR16 and NV, and after `virsh
// destroy` Debian's swtpm alone boots it again with its NV value.
func emulatorBackToSwtpm(t *testing.T, env emulatorEnv) {
	vm := newEmulatorVM(t, env.a)
	value := "back-" + randHex(t, 6)

	vm.define(t, "console1.log", loopConfig(value, "under-nkp"))
	vm.runNKP(t, env, "start", vm.name)
	before := lastValues(vm.waitFirstLoop(t), "pcr16")
	before["nv"] = value

	image, lastLoop := vm.save(t)
	vm.runDebian(t, env, "restore", image)
	checkKept(t, "virsh restore under Debian's swtpm", vm.console.waitLoopAfter(t, lastLoop, vm.stopped), before)

	vm.destroyForNVRead(t)
	vm.runDebian(t, env, "start", vm.name)
	checkKept(t, "Debian's swtpm's start on the state it took back", vm.waitDone(t), map[string]string{"nv": value})
}

// emulatorWrongSecret: with another value in the domain's secret, `virsh start` fails,
// the swtpm log names the state file and the wrong key, no TPM process is left holding
// the state, and the state files are unchanged; with the right value back, the guest
// reads its NV value.
func emulatorWrongSecret(t *testing.T, env emulatorEnv) {
	vm := newEmulatorVM(t, env.a)
	value := "key-" + randHex(t, 6)

	vm.define(t, "console1.log", guest.Config{Actions: []string{guest.ActionNVWrite}, NV: value})
	vm.runNKP(t, env, "start", vm.name)
	vm.waitDone(t)
	vm.waitPowerOff(t)
	before := snapshot(t, vm.storage())
	if len(before) == 0 {
		t.Fatalf("no state files in %s after the first boot", vm.storage())
	}

	right := vm.passphrase
	vm.setSecret(t, randHex(t, 32))
	vm.define(t, "console2.log", guest.Config{Actions: []string{guest.ActionNVRead}})
	var startErr error
	env.ov.during(t, func() { _, startErr = virsh("start", vm.name) })
	if startErr == nil {
		t.Fatalf("virsh start succeeded with a wrong secret value\n%s", vm.logTail())
	}
	t.Logf("virsh start with a wrong secret: %v", startErr)
	permall := filepath.Join(vm.storage(), "tpm2-00.permall")
	e2e.WaitFor(t, backendTimeout, "nkp-swtpm to log the wrong key", func() bool {
		for _, l := range vm.logLines() {
			if strings.Contains(l, "level=ERROR") && strings.Contains(l, permall) && strings.Contains(l, "wrong key") {
				return true
			}
		}
		return false
	})
	vm.waitPowerOff(t) // libvirt shuts the domain off when its TPM does not start
	checkUnchanged(t, "after a start with a wrong secret", before, snapshot(t, vm.storage()))

	vm.setSecret(t, right)
	vm.runNKP(t, env, "start", vm.name)
	checkKept(t, "the right secret is back", vm.waitDone(t), map[string]string{"nv": value})
}

// emulatorVM is a persistent libvirt domain with an emulator TPM, undefined (with its
// TPM state) and its secret removed at the end of the test.
type emulatorVM struct {
	name, uuid     string
	dir            string
	kernel, initrd string
	console        console
	secret         string // libvirt secret UUID
	passphrase     string // the secret's value, to check it never shows
}

// newEmulatorVM copies the guest into a work directory of the test (workDir) and
// defines the libvirt secret of the vTPM.
func newEmulatorVM(t *testing.T, a guest.Artifacts) *emulatorVM {
	t.Helper()
	dir := workDir(t)
	u := randHex(t, 16)
	vm := &emulatorVM{
		name: emulatorPrefix + randHex(t, 6),
		uuid: u[0:8] + "-" + u[8:12] + "-" + u[12:16] + "-" + u[16:20] + "-" + u[20:32],
		dir:  dir,
	}
	vm.kernel, vm.initrd = copyGuest(t, a, dir)
	vm.defineSecret(t)
	t.Cleanup(func() {
		virsh("destroy", vm.name)
		virsh("undefine", vm.name, "--tpm")
		logPath := vm.logPath()
		if t.Failed() {
			if b, err := os.ReadFile(logPath); err == nil {
				if len(b) > 8000 {
					b = b[len(b)-8000:]
				}
				t.Logf("--- %s ---\n%s", logPath, b)
			}
		}
		os.Remove(logPath) // libvirt keeps a domain's swtpm log after undefine
	})
	return vm
}

// defineSecret defines an ephemeral private vtpm secret (never written to
// /etc/libvirt/secrets) and sets a random passphrase from a 0600 file, not from argv.
func (vm *emulatorVM) defineSecret(t *testing.T) {
	t.Helper()
	vm.secret = vm.uuid[:24] + randHex(t, 6) // a UUID of its own
	secretXML := filepath.Join(vm.dir, "secret.xml")
	err := os.WriteFile(secretXML, fmt.Appendf(nil, `<secret ephemeral='yes' private='yes'>
  <uuid>%s</uuid>
  <usage type='vtpm'><name>%s</name></usage>
</secret>
`, vm.secret, vm.name), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := virsh("secret-define", secretXML); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { virsh("secret-undefine", vm.secret) })
	vm.setSecret(t, randHex(t, 32))
}

// setSecret sets the secret's value from a 0600 file (never argv) and remembers it.
func (vm *emulatorVM) setSecret(t *testing.T, passphrase string) {
	t.Helper()
	vm.passphrase = passphrase
	pwFile := filepath.Join(vm.dir, "passphrase")
	if err := os.WriteFile(pwFile, []byte(passphrase), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := virsh("secret-set-value", "--secret", vm.secret, "--file", pwFile, "--plain")
	os.Remove(pwFile)
	if err != nil {
		t.Fatal(err)
	}
}

// define (re)defines the domain to boot the guest with cfg, its console in dir/consoleName.
func (vm *emulatorVM) define(t *testing.T, consoleName string, cfg guest.Config) {
	t.Helper()
	args, err := cfg.KernelArgs()
	if err != nil {
		t.Fatal(err)
	}
	vm.console = console(filepath.Join(vm.dir, consoleName))
	xmlPath := domainSpec{
		Name: vm.name, UUID: vm.uuid, Kernel: vm.kernel, Initrd: vm.initrd,
		Cmdline: args, Console: string(vm.console), Secret: vm.secret,
	}.write(t, vm.dir)
	vm.virsh(t, "define", xmlPath)
}

// virsh runs a virsh command that must succeed; a failure shows the swtpm log.
func (vm *emulatorVM) virsh(t *testing.T, args ...string) {
	t.Helper()
	if _, err := virsh(args...); err != nil {
		t.Fatalf("%v\n%s", err, vm.logTail())
	}
}

func (vm *emulatorVM) storage() string {
	return filepath.Join(libvirtSwtpmStorage, vm.uuid, "tpm2")
}

func (vm *emulatorVM) logPath() string {
	return filepath.Join(libvirtSwtpmLogs, vm.name+"-swtpm.log")
}

func (vm *emulatorVM) logTail() string {
	b, err := os.ReadFile(vm.logPath())
	if err != nil {
		return ""
	}
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return fmt.Sprintf("--- %s ---\n%s", vm.logPath(), b)
}

// stopped reports whether the domain does not run.
func (vm *emulatorVM) stopped() bool {
	out, err := virsh("domstate", vm.name)
	return err != nil || strings.Contains(out, "shut off")
}

// tpmProcs returns the live (not zombie) processes that serve this domain's state the
// way libvirt starts swtpm: --ctrl type=unixio,path=… and --tpmstate dir=<storage>.
// swtpm_setup's own TPM process (--ctrl clientfd=, --server type=tcp,fd=) is not one.
func (vm *emulatorVM) tpmProcs() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		var state, unixCtrl bool
		for i := 0; i+1 < len(args); i++ {
			switch args[i] {
			case "--tpmstate":
				state = args[i+1] == "dir="+vm.storage() || strings.HasPrefix(args[i+1], "dir="+vm.storage()+",")
			case "--ctrl":
				unixCtrl = strings.HasPrefix(args[i+1], "type=unixio,path=")
			}
		}
		if state && unixCtrl && !zombie(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// zombie reports whether pid has exited and waits to be reaped (PID 1 here reaps
// nothing, and libvirt daemonizes swtpm).
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z'
}

// waitNoTPM waits until no TPM process serves the domain's state any more.
func (vm *emulatorVM) waitNoTPM(t *testing.T) {
	t.Helper()
	e2e.WaitFor(t, exitTimeout, "the TPM process of "+vm.name+" to exit", func() bool { return len(vm.tpmProcs()) == 0 })
}

// waitTPMProcess waits for the one live TPM process that serves the domain's state and
// returns its pid.
func (vm *emulatorVM) waitTPMProcess(t *testing.T) int {
	t.Helper()
	var pids []int
	err := e2e.Poll(backendTimeout, func() bool {
		pids = vm.tpmProcs()
		return len(pids) > 0
	})
	if err != nil {
		t.Fatalf("no TPM process serves %s after libvirt started the domain: %v\n%s", vm.storage(), err, vm.logTail())
	}
	if len(pids) != 1 {
		t.Fatalf("%d TPM processes serve %s, want 1: %v", len(pids), vm.storage(), pids)
	}
	return pids[0]
}

// runNKP runs a virsh command that starts the domain's TPM (start, restore) with
// nkp-swtpm in place of swtpm, checks the TPM process libvirt started
// (checkTPMProcess) and returns its pid.
func (vm *emulatorVM) runNKP(t *testing.T, env emulatorEnv, args ...string) int {
	t.Helper()
	env.ov.during(t, func() { vm.virsh(t, args...) })
	return vm.checkTPMProcess(t, env.ov, env.tss)
}

// runDebian runs a virsh command that starts the domain's TPM (start, restore) with no
// override, and checks that the TPM process runs Debian's swtpm; it returns its pid.
func (vm *emulatorVM) runDebian(t *testing.T, env emulatorEnv, args ...string) int {
	t.Helper()
	vm.virsh(t, args...)
	return vm.checkDebianTPM(t, env.ov)
}

// waitDone waits for the guest's done=ok, checks the TPM it saw and returns its records.
func (vm *emulatorVM) waitDone(t *testing.T) []guest.Record {
	t.Helper()
	recs := vm.console.waitFor(t, "done=ok", vm.stopped, has("done", "ok"))
	checkTPMInfo(t, recs)
	return recs
}

// waitFirstLoop waits for the guest's first loop line, checks the TPM it saw and
// returns its records.
func (vm *emulatorVM) waitFirstLoop(t *testing.T) []guest.Record {
	t.Helper()
	recs := vm.console.waitFor(t, "the first loop line", vm.stopped, has("loop", ""))
	checkTPMInfo(t, recs)
	return recs
}

// save saves the running domain with `virsh save` to dir/vm.save, waits for its TPM
// process to exit, and returns the image and the guest's last loop counter before it.
func (vm *emulatorVM) save(t *testing.T) (image string, lastLoop int) {
	t.Helper()
	image = filepath.Join(vm.dir, "vm.save")
	vm.virsh(t, "save", vm.name, image)
	vm.waitNoTPM(t)
	return image, lastLoopIndex(vm.console.records())
}

// destroyForNVRead redefines the domain to boot a guest that only reads NV (console2.log),
// then cuts the running one's power (`virsh destroy`, no TPM2_Shutdown) and waits for
// its TPM process to exit.
func (vm *emulatorVM) destroyForNVRead(t *testing.T) {
	t.Helper()
	vm.define(t, "console2.log", guest.Config{Actions: []string{guest.ActionNVRead}})
	vm.virsh(t, "destroy", vm.name)
	vm.waitNoTPM(t)
}

// waitPowerOff waits for the guest to power off and the domain's TPM process to exit.
func (vm *emulatorVM) waitPowerOff(t *testing.T) {
	t.Helper()
	e2e.WaitFor(t, bootTimeout, "domain "+vm.name+" to power off", vm.stopped)
	vm.waitNoTPM(t)
}

// checkDebianTPM checks that the TPM process libvirt started for the domain runs
// Debian's swtpm (the override is not mounted) and returns its pid.
func (vm *emulatorVM) checkDebianTPM(t *testing.T, ov *swtpmOverride) int {
	t.Helper()
	pid := vm.waitTPMProcess(t)
	debian, err := os.Stat(ov.target)
	if err != nil {
		t.Fatal(err)
	}
	if exe, err := os.Stat(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || !os.SameFile(exe, debian) {
		t.Fatalf("TPM process %d does not run Debian's %s (stat: %v): the override leaked", pid, ov.target, err)
	}
	return pid
}

// checkTPMProcess checks the one TPM process libvirt started for the domain: it runs the
// bind-mounted nkp-swtpm (same file), as swtpm_user, under a seccomp filter, with no
// secret in its argv, and its log says it serves this state directory encrypted. It
// returns the pid.
func (vm *emulatorVM) checkTPMProcess(t *testing.T, ov *swtpmOverride, u *user.User) int {
	t.Helper()
	pid := vm.waitTPMProcess(t)
	exe, err := os.Stat(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatalf("TPM process %d: %v", pid, err)
	}
	if !os.SameFile(exe, ov.info) {
		t.Errorf("TPM process %d does not run the nkp-swtpm copy %s (libvirt started another swtpm)", pid, ov.copy)
	}
	if uid := processStatus(t, pid, "Uid"); uid != u.Uid {
		t.Errorf("TPM process %d runs as uid %s, want %s (%s, libvirt's swtpm_user)", pid, uid, u.Uid, u.Username)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if bytes.Contains(cmdline, []byte(vm.passphrase)) {
		t.Errorf("the secret's value is in the TPM process's argv")
	}
	for _, want := range []string{"--key\x00pwdfd=", "--migration-key\x00pwdfd=", "--terminate"} {
		if !bytes.Contains(cmdline, []byte(want)) {
			t.Errorf("libvirt's swtpm command line lacks %q: %q", want, cmdline)
		}
	}
	line := fmt.Sprintf(" pid=%d", pid)
	e2e.WaitFor(t, backendTimeout, "nkp-swtpm's serving line for pid "+strconv.Itoa(pid), func() bool {
		for _, l := range vm.logLines() {
			if strings.Contains(l, `msg="nkp-swtpm serving"`) && strings.Contains(l, line) &&
				strings.Contains(l, "state="+vm.storage()+" ") && strings.Contains(l, "encrypted=true") {
				return true
			}
		}
		return false
	})
	// libvirt passes no --seccomp: nkp-swtpm's default, like swtpm's, is a kill filter,
	// installed before the serving line.
	if mode := processStatus(t, pid, "Seccomp"); mode != "2" {
		t.Errorf("TPM process %d: Seccomp mode %s in /proc/%d/status, want 2 (a filter; the default --seccomp action=kill)", pid, mode, pid)
	}
	return pid
}

func (vm *emulatorVM) logLines() []string {
	b, _ := os.ReadFile(vm.logPath())
	return strings.Split(string(b), "\n")
}

// checkSetupLog checks, in the log libvirt gives swtpm_setup and swtpm, that swtpm_setup
// ran its TPM with nkp-swtpm, created the RSA EK certificate's NV index 0x1c00002 in it
// and finished, before libvirt's own nkp-swtpm (pid) started; and that the secret's
// value is nowhere in the log.
func (vm *emulatorVM) checkSetupLog(t *testing.T, pid int) {
	t.Helper()
	b, err := os.ReadFile(vm.logPath())
	if err != nil {
		t.Fatal(err)
	}
	log := string(b)
	steps := []string{
		"Starting vTPM manufacturing",
		`msg="nkp-swtpm serving"`, // swtpm_setup's TPM
		"Successfully created RSA 2048 EK",
		"Successfully created NVRAM area 0x1c00002 for RSA 2048 EK certificate",
		"Successfully authored TPM state",
		fmt.Sprintf(" pid=%d", pid), // libvirt's TPM
	}
	at := 0
	for _, s := range steps {
		i := strings.Index(log[at:], s)
		if i < 0 {
			t.Fatalf("swtpm log %s: no %q after byte %d (steps in order: %q)\n%s", vm.logPath(), s, at, steps, vm.logTail())
		}
		at += i + len(s)
	}
	if strings.Contains(log, vm.passphrase) {
		t.Errorf("the secret's value is in the swtpm log %s", vm.logPath())
	}
}

// checkSavedTPMBlob checks the TPM's permanent state blob in a `virsh save` image: it is
// in swtpm's envelope, encrypted with the migration key (TLV TagEncryptedMigrationData,
// no plaintext TagMigrationData), and that key is the one swtpm derives from the
// secret's value: the blob opens with it and not with another.
func (vm *emulatorVM) checkSavedTPMBlob(t *testing.T, image string) {
	t.Helper()
	b, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := tpmEmulatorBlob(b)
	if err != nil {
		t.Fatalf("save image %s: %v", image, err)
	}
	_, body, err := envelope.ParseHeader(blob)
	if err != nil {
		t.Fatalf("save image %s: the TPM's permanent blob is not in swtpm's envelope: %v", image, err)
	}
	if _, ok := envelope.Find(body, envelope.TagEncryptedMigrationData); !ok {
		t.Errorf("save image %s: the TPM's permanent blob is not encrypted with the migration key", image)
	}
	if _, ok := envelope.Find(body, envelope.TagMigrationData); ok {
		t.Errorf("save image %s: the TPM's permanent blob carries plaintext migration data", image)
	}
	for _, tt := range []struct {
		passphrase string
		opens      bool
	}{
		{vm.passphrase, true},
		{randHex(t, 32), false},
	} {
		key, err := envelope.DeriveKey([]byte(tt.passphrase), 32, envelope.KDFPBKDF2)
		if err != nil {
			t.Fatal(err)
		}
		state, err := envelope.FromMigration(blob, 0, key, nil)
		clear(key)
		if opened := err == nil && len(state) > 0; opened != tt.opens {
			t.Errorf("save image %s: the TPM's permanent blob opens with the key of passphrase %s… = %v (%v), want %v", image, tt.passphrase[:8], opened, err, tt.opens)
		}
		clear(state)
	}
}

// tpmEmulatorBlob returns the permanent state blob of QEMU's "tpm-emulator" device
// section in a migration stream (what `virsh save` writes after libvirt's header):
// a full section is 0x04, section id (4 bytes), the id string with a length byte,
// instance id and version id (4 bytes each), then the device's fields, of which the
// first are the permanent blob's flags and length (4 bytes each) and the blob.
func tpmEmulatorBlob(stream []byte) ([]byte, error) {
	const idstr = "tpm-emulator"
	marker := append([]byte{byte(len(idstr))}, idstr...)
	for from := 0; ; {
		i := bytes.Index(stream[from:], marker)
		if i < 0 {
			return nil, errors.New(`no QEMU section "tpm-emulator" holding a TPM state blob`)
		}
		i += from
		from = i + 1
		if i < 5 || stream[i-5] != 0x04 { // not a full section header: the vmdesc JSON, say
			continue
		}
		p := i + len(marker) + 8 // instance id, version id
		if p+8 > len(stream) {
			continue
		}
		n := int(binary.BigEndian.Uint32(stream[p+4 : p+8]))
		p += 8
		if n == 0 || n > len(stream)-p {
			continue
		}
		return stream[p : p+n], nil
	}
}

// checkState checks the state libvirt keeps: nkp's encrypted format,
// owned by swtpm_user, mode 0600 (libvirt's --tpmstate mode=0600), and no plaintext of
// the NV value the guest wrote.
func (vm *emulatorVM) checkState(t *testing.T, u *user.User, nvValue string) {
	t.Helper()
	entries, err := os.ReadDir(vm.storage())
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		if e.Name() == ".lock" || !e.Type().IsRegular() {
			continue
		}
		files = append(files, e.Name())
		p := filepath.Join(vm.storage(), e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		// .nkp-state-id is the directory's state ID (32 hex digits, not secret), bound
		// into every record; every other file is an encrypted state file.
		if e.Name() != ".nkp-state-id" && !bytes.HasPrefix(b, []byte(nkpStateMagic)) {
			n := min(len(b), 16)
			t.Errorf("%s starts with % x, not nkp's encrypted format (%q)", p, b[:n], nkpStateMagic)
		}
		if bytes.Contains(b, []byte(nvValue)) {
			t.Errorf("%s holds the guest's NV value %q in plaintext", p, nvValue)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %#o, want 0600 (libvirt passes --tpmstate mode=0600)", p, fi.Mode().Perm())
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && strconv.Itoa(int(st.Uid)) != u.Uid {
			t.Errorf("%s is owned by uid %d, want %s (%s)", p, st.Uid, u.Uid, u.Username)
		}
	}
	if !slices.Contains(files, "tpm2-00.permall") {
		t.Errorf("state %s holds %v, want tpm2-00.permall", vm.storage(), files)
	}
}

// processStatus returns the first value of the field key ("Uid", "Seccomp") in
// /proc/PID/status: the real uid, the seccomp mode (2: a filter).
func processStatus(t *testing.T, pid int, key string) string {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("process %d: %v", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			if fields := strings.Fields(rest); len(fields) > 0 {
				return fields[0]
			}
		}
	}
	t.Fatalf("process %d: no %s line in its status", pid, key)
	return ""
}

// swtpmUser returns the user libvirt runs swtpm as: qemu.conf's swtpm_user, else tss.
func swtpmUser(t *testing.T) *user.User {
	t.Helper()
	name := "tss"
	if b, err := os.ReadFile(libvirtQEMUConf); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
			if ok && strings.TrimSpace(k) == "swtpm_user" {
				name = strings.Trim(strings.TrimSpace(v), `"`)
			}
		}
	}
	u, err := user.Lookup(name)
	if err != nil {
		e2e.Unavailable(t, fmt.Sprintf("libvirt's swtpm_user %q does not exist (Debian's swtpm package creates tss): %v", name, err))
	}
	return u
}

// prepareLocalCA hands swtpm_localca's files to swtpm_user. Debian creates the
// directory for tss, but swtpm_setup run as root (test/swtpmtools does) creates the CA
// files as root, and then swtpm_setup under libvirt, run as tss, fails with "Need
// read/write rights on /var/lib/swtpm-localca/.lock.swtpm-localca for user tss".
// root keeps its access to the files.
func prepareLocalCA(t *testing.T, u *user.User) {
	t.Helper()
	uid, _ := strconv.Atoi(u.Uid)
	entries, err := os.ReadDir(swtpmLocalCA)
	if errors.Is(err, fs.ErrNotExist) {
		return // swtpm_localca creates it
	}
	if err != nil {
		t.Fatalf("swtpm_localca's directory: %v", err)
	}
	for _, e := range entries {
		p := filepath.Join(swtpmLocalCA, e.Name())
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != uid {
			if err := os.Lchown(p, uid, -1); err != nil {
				t.Fatalf("give %s to %s (swtpm_setup runs as it under libvirt): %v", p, u.Username, err)
			}
			t.Logf("%s was owned by uid %d: now %s's, as swtpm_setup under libvirt needs", p, st.Uid, u.Username)
		}
	}
}

// removeStaleDomains undefines, with their TPM state, the domains and secrets that a
// killed earlier run of this test left (named emulatorPrefix…). Called under the
// override lock, so no live run of the test owns them.
func removeStaleDomains(t *testing.T) {
	t.Helper()
	out, err := virsh("list", "--all", "--name")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range strings.Fields(out) {
		if !strings.HasPrefix(name, emulatorPrefix) {
			continue
		}
		virsh("destroy", name)
		if _, err := virsh("undefine", name, "--tpm"); err != nil {
			t.Fatalf("remove the domain %s an earlier run left: %v", name, err)
		}
		os.Remove(filepath.Join(libvirtSwtpmLogs, name+"-swtpm.log"))
		t.Logf("removed the domain %s (and its TPM state) that an earlier run left", name)
	}
	out, err = virsh("secret-list")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[1] == "vtpm" && strings.HasPrefix(f[2], emulatorPrefix) {
			if _, err := virsh("secret-undefine", f[0]); err != nil {
				t.Fatalf("remove the secret %s an earlier run left: %v", f[0], err)
			}
			t.Logf("removed the secret %s (%s) that an earlier run left", f[0], f[2])
		}
	}
}

// swtpmOverride puts a copy of nkp-swtpm in place of the swtpm that libvirtd runs, by a
// bind mount, only while during runs. The copy is private to the test, so a rebuild of
// bin/nkp-swtpm meanwhile does not matter, and its mtime makes libvirt probe its
// capabilities again (libvirt caches them by the binary's mtime).
type swtpmOverride struct {
	target  string      // the swtpm libvirtd finds in its PATH
	copy    string      // nkp-swtpm's copy, in a directory named with overrideMark
	info    os.FileInfo // the copy, to recognise it behind /proc/PID/exe
	mounted bool
}

// newSwtpmOverride takes the host-wide override lock, removes bind mounts a killed
// earlier run left on the target, and copies bin.
func newSwtpmOverride(t *testing.T, bin string) *swtpmOverride {
	t.Helper()
	target, err := filepath.EvalSymlinks("/usr/bin/swtpm")
	if err != nil {
		e2e.Unavailable(t, "no /usr/bin/swtpm, the swtpm that libvirtd runs (install swtpm: make setup): "+err.Error())
	}
	lockOverride(t)
	removeStaleOverrides(t, target)
	dir, err := os.MkdirTemp("", overrideMark)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ov := &swtpmOverride{target: target, copy: filepath.Join(dir, "swtpm")}
	guesttest.CopyFile(t, bin, ov.copy)
	if err := os.Chmod(ov.copy, 0o755); err != nil {
		t.Fatal(err)
	}
	if ov.info, err = os.Stat(ov.copy); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ov.unmount)
	return ov
}

// during runs fn with nkp-swtpm bind-mounted over the target.
func (ov *swtpmOverride) during(t *testing.T, fn func()) {
	t.Helper()
	if err := syscall.Mount(ov.copy, ov.target, "", syscall.MS_BIND, ""); err != nil {
		t.Fatalf("bind-mount nkp-swtpm over %s: %v", ov.target, err)
	}
	ov.mounted = true
	defer ov.unmount()
	fn()
}

// unmount detaches the bind mount; processes started from it keep running.
func (ov *swtpmOverride) unmount() {
	if ov.mounted {
		syscall.Unmount(ov.target, syscall.MNT_DETACH)
		ov.mounted = false
	}
}

// lockOverride takes the host-wide lock that keeps two test processes from overriding
// swtpm at once (it is released when the test binary exits or the test ends).
func lockOverride(t *testing.T) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(overrideLockFile), 0o755); err != nil {
		t.Fatalf("override lock: %v", err)
	}
	f, err := os.OpenFile(overrideLockFile, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatalf("override lock: %v", err)
	}
	err = e2e.Poll(10*time.Minute, func() bool {
		return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil
	})
	if err != nil {
		f.Close()
		t.Fatalf("another test process holds %s (overriding swtpm for libvirt): %v", overrideLockFile, err)
	}
	t.Cleanup(func() { f.Close() })
}

// removeStaleOverrides detaches every bind mount on target that an earlier run of this
// test left (a copy under a directory named with overrideMark). Any other mount there
// is someone else's: the test fails rather than stack on it or remove it.
func removeStaleOverrides(t *testing.T, target string) {
	t.Helper()
	for range 16 { // mounts may be stacked; each round removes the top one
		roots, err := mountsAt(target)
		if err != nil {
			t.Fatal(err)
		}
		if len(roots) == 0 {
			return
		}
		top := roots[len(roots)-1]
		if !strings.Contains(top, overrideMark) {
			t.Fatalf("%s has a bind mount from %q that this test did not make: remove it (umount -l %s) to run the test", target, top, target)
		}
		if err := syscall.Unmount(target, syscall.MNT_DETACH); err != nil {
			t.Fatalf("remove the stale nkp-swtpm bind mount on %s (from %s): %v", target, top, err)
		}
		t.Logf("removed a stale nkp-swtpm bind mount on %s (from %s), left by an earlier run", target, top)
	}
	t.Fatalf("more than 16 bind mounts stacked on %s", target)
}

// mountsAt returns the roots (source paths inside their file system) of the mounts whose
// mount point is path, in /proc/self/mountinfo's order (the last one is on top).
func mountsAt(path string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	return parseMountsAt(b, path), nil
}

// parseMountsAt is mountsAt on mountinfo's text: field 4 is the root, field 5 the mount
// point, both with spaces and the like escaped as \ooo.
func parseMountsAt(mountinfo []byte, path string) []string {
	var roots []string
	for _, line := range strings.Split(string(mountinfo), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		if unescapeMount(f[4]) == path {
			roots = append(roots, unescapeMount(f[3]))
		}
	}
	return roots
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// TestParseMountsAt reads mount tables as Linux 6.1 writes them; the second bind mount
// is one whose source file was removed (a killed run whose directory was cleaned up).
func TestParseMountsAt(t *testing.T) {
	const info = `22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
43 22 254:0 /tmp/nkp-emulator-swtpm-1/swtpm /usr/bin/swtpm rw,relatime - ext4 /dev/vda rw
44 22 254:0 /tmp/nkp-emulator-swtpm-2/swtpm//deleted /usr/bin/swtpm rw - ext4 /dev/vda rw
45 22 0:21 /a\040b /usr/bin/swtpm_setup rw - tmpfs tmpfs rw
46 22 0:21 /c /mnt/with\040space rw - tmpfs tmpfs rw
`
	tests := []struct {
		path string
		want []string
	}{
		{"/usr/bin/swtpm", []string{"/tmp/nkp-emulator-swtpm-1/swtpm", "/tmp/nkp-emulator-swtpm-2/swtpm//deleted"}},
		{"/usr/bin/swtpm_setup", []string{"/a b"}},
		{"/mnt/with space", []string{"/c"}},
		{"/usr/bin/swtpm_ioctl", nil},
	}
	for _, tt := range tests {
		got := parseMountsAt([]byte(info), tt.path)
		if strings.Join(got, "|") != strings.Join(tt.want, "|") {
			t.Errorf("mounts at %s = %q, want %q", tt.path, got, tt.want)
		}
	}
}

// TestTPMEmulatorBlob finds the device section as QEMU 7.2 writes it and skips what
// only looks like it (the name in the vmdesc JSON, a truncated section).
func TestTPMEmulatorBlob(t *testing.T) {
	section := func(blob []byte, declared int) []byte {
		b := []byte{0x04, 0, 0, 0, 5, 12}
		b = append(b, "tpm-emulator"...)
		b = append(b, 0, 0, 0, 0, 0, 0, 0, 0)   // instance id, version id
		b = binary.BigEndian.AppendUint32(b, 0) // permanent flags
		b = binary.BigEndian.AppendUint32(b, uint32(declared))
		return append(b, blob...)
	}
	blob := []byte{2, 1, 0, 10, 0, 0x16, 0, 0, 0, 10}
	tests := []struct {
		name   string
		stream []byte
		want   []byte // nil: an error
	}{
		{"section", append(append([]byte("QEVM..."), section(blob, len(blob))...), "more"...), blob},
		{"vmdesc name first", append([]byte("{\"name\": \"\x0ctpm-emulator\"}"), section(blob, len(blob))...), blob},
		{"truncated blob", section(blob, len(blob)+1), nil},
		{"empty blob", section(nil, 0), nil},
		{"no section", []byte("tpm-emulator"), nil},
		{"header cut", []byte{0x04, 0, 0, 0, 5, 12, 't', 'p', 'm', '-', 'e', 'm', 'u', 'l', 'a', 't', 'o', 'r', 0}, nil},
	}
	for _, tt := range tests {
		got, err := tpmEmulatorBlob(tt.stream)
		if tt.want == nil {
			if err == nil {
				t.Errorf("%s: got blob % x, want an error", tt.name, got)
			}
			continue
		}
		if err != nil || !bytes.Equal(got, tt.want) {
			t.Errorf("%s: got % x, %v; want % x", tt.name, got, err, tt.want)
		}
	}
}
