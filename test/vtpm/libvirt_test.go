package vtpm

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/guest"
	"github.com/nkp-dev/nkp/test/guest/guesttest"
)

const libvirtURI = "qemu:///system"

// requireLibvirt skips (or fails under NKP_E2E=required) unless libvirtd answers.
func requireLibvirt(t *testing.T) {
	t.Helper()
	e2e.Require(t, "virsh")
	if _, err := virsh("version"); err != nil {
		e2e.Unavailable(t, fmt.Sprintf("libvirtd does not answer on %s (start it with `make setup`): %v", libvirtURI, err))
	}
}

// virshTimeout bounds one virsh command: save and restore of the 256 MiB guest take
// seconds, a loaded machine stretches that, a hung libvirtd must not take the whole run.
const virshTimeout = 3 * time.Minute

// virsh runs one virsh command on libvirtURI, killed after virshTimeout.
func virsh(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), virshTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", libvirtURI}, args...)...).CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w after %v (is libvirtd hung? see its log)", ctx.Err(), virshTimeout)
	}
	if err != nil {
		return string(out), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// libvirtVM is a transient libvirt domain: it disappears when the guest powers off.
type libvirtVM struct {
	name    string
	console console
}

// createDomain copies the guest into dir (libvirt relabels kernel and initrd, so the
// shared cache is left alone), writes the domain XML and starts it with `virsh create`.
func createDomain(t *testing.T, a guest.Artifacts, dir string, v *vtpm, cfg guest.Config) *libvirtVM {
	t.Helper()
	args, err := cfg.KernelArgs()
	if err != nil {
		t.Fatal(err)
	}
	vm := &libvirtVM{name: "nkp-vtpm-" + randHex(t, 6), console: console(filepath.Join(dir, "console.log"))}
	kernel, initrd := copyGuest(t, a, dir)
	xmlPath := domainSpec{
		Name: vm.name, Kernel: kernel, Initrd: initrd, Cmdline: args,
		Console: string(vm.console), Socket: v.sock,
	}.write(t, dir)
	t.Cleanup(func() { virsh("destroy", vm.name) })
	if _, err := virsh("create", xmlPath); err != nil {
		t.Fatalf("start domain: %v\n%s", err, v.logTail())
	}
	return vm
}

// gone reports whether the transient domain no longer runs.
func (vm *libvirtVM) gone() bool {
	out, err := virsh("domstate", vm.name)
	return err != nil || strings.Contains(out, "shut off")
}

func (vm *libvirtVM) waitGone(t *testing.T) {
	t.Helper()
	e2e.WaitFor(t, bootTimeout, "domain "+vm.name+" to stop", vm.gone)
}

// TestLibvirtExternalBackend boots the guest through libvirt with
// <backend type='external'> pointing at a backend the test started: the guest sees a
// TPM 2.0 with a firmware-measured PCR0, and the backend ends when QEMU stops.
func TestLibvirtExternalBackend(t *testing.T) {
	a := guesttest.Require(t)
	requireLibvirt(t)
	for _, be := range backends(t) {
		t.Run(be.Name, func(t *testing.T) {
			dir := workDir(t)
			v := startVTPM(t, be, dir, "tpm", filepath.Join(dir, "state"), newKey(t), true)
			vm := createDomain(t, a, dir, v, guest.Config{})
			recs := vm.console.waitFor(t, "done=ok", vm.gone, has("done", "ok"))
			checkTPMInfo(t, recs)
			vm.waitGone(t)
			v.waitExit(t)
		})
	}
}

// TestLibvirtSaveRestore runs a guest that extends a PCR and writes NV, saves it with
// `virsh save`, and restores it with `virsh restore` against a fresh backend process on
// an empty state directory with another key: the vTPM state travels in the save image
// (GET/SET_STATEBLOB, swtpm's envelope), and the running guest still sees its PCRs and NV
// value. Every pair of backends is tried: an image saved with swtpm restores on
// nkp-swtpm and the other way round.
func TestLibvirtSaveRestore(t *testing.T) {
	a := guesttest.Require(t)
	requireLibvirt(t)
	bs := backends(t)
	for _, src := range bs {
		for _, dst := range bs {
			name := src.Name
			if dst != src {
				name += "-to-" + dst.Name
			}
			t.Run(name, func(t *testing.T) { saveRestore(t, a, src, dst) })
		}
	}
}

func saveRestore(t *testing.T, a guest.Artifacts, src, dst backend) {
	t.Helper()
	dir := workDir(t)
	value := "save-" + randHex(t, 6)
	cfg := loopConfig(value, "before-save")
	v1 := startVTPM(t, src, dir, "tpm", filepath.Join(dir, "state1"), newKey(t), true)
	vm := createDomain(t, a, dir, v1, cfg)
	recs := vm.console.waitFor(t, "the first loop line", vm.gone, has("loop", ""))
	checkTPMInfo(t, recs)
	before := lastValues(recs, "pcr0", "pcr16")
	before["nv"] = value

	image := filepath.Join(dir, "vm.save")
	if _, err := virsh("save", vm.name, image); err != nil {
		t.Fatalf("%v\n%s", err, v1.logTail())
	}
	lastLoop := lastLoopIndex(vm.console.records())
	v1.waitExit(t)

	v2 := startVTPM(t, dst, dir, "tpm", filepath.Join(dir, "state2"), newKey(t), true)
	if _, err := virsh("restore", image); err != nil {
		t.Fatalf("%v\n%s", err, v2.logTail())
	}
	checkKept(t, "virsh restore", vm.console.waitLoopAfter(t, lastLoop, vm.gone), before)
	if _, err := virsh("destroy", vm.name); err != nil {
		t.Fatal(err)
	}
	v2.waitExit(t)
}

// lastLoopIndex is the highest loop counter on the console, 0 if none.
func lastLoopIndex(recs []guest.Record) int {
	n := 0
	for _, r := range recs {
		if i, err := strconv.Atoi(r["loop"]); err == nil && i > n {
			n = i
		}
	}
	return n
}
