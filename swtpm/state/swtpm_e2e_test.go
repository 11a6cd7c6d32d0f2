package state

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestSwtpmReadsOurPlaintext: a state directory nkp wrote without a key is one that real
// swtpm starts from (INIT succeeds) and whose permanent state it hands back unchanged.
func TestSwtpmReadsOurPlaintext(t *testing.T) {
	e2e.Require(t, "swtpm", "swtpm_ioctl")
	ref, err := os.ReadFile(filepath.Join(fixtures, "plain", "ref.permall"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	d := mustOpen(t, dir, Options{Mode: 0o600})
	if err := d.Store("permall", ref); err != nil {
		t.Fatal(err)
	}
	d.Close()

	ctrl := filepath.Join(t.TempDir(), "ctrl")
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--ctrl", "type=unixio,path="+ctrl, "--log", "file="+filepath.Join(filepath.Dir(ctrl), "log"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = exec.Command("swtpm_ioctl", "--unix", ctrl, "-s").Run()
		_ = cmd.Wait()
	})
	e2e.WaitFor(t, 5*time.Second, "swtpm's control socket", func() bool {
		_, err := os.Stat(ctrl)
		return err == nil
	})
	ioctl := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("swtpm_ioctl", append([]string{"--unix", ctrl}, args...)...).CombinedOutput(); err != nil {
			log, _ := os.ReadFile(filepath.Join(filepath.Dir(ctrl), "log"))
			t.Fatalf("swtpm_ioctl %v: %v: %s\nswtpm log:\n%s", args, err, out, log)
		}
	}
	ioctl("-i") // INIT: swtpm loads tpm2-00.permall as nkp wrote it
	saved := filepath.Join(t.TempDir(), "permall")
	ioctl("--save", "permanent", saved)
	blob, _ := os.ReadFile(saved)
	got, err := envelope.FromMigration(blob, 0, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ref) {
		t.Errorf("swtpm's permanent state (%d bytes) differs from what nkp stored (%d bytes)", len(got), len(ref))
	}
}
