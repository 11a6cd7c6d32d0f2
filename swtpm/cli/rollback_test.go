package cli

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/state"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestRollbackAtStart: nkp-swtpm given a state file whose newest record was damaged
// after its write refuses to start the TPM, names the file and the way out, and leaves
// the file alone; with --tpmstate ...,accept-rollback it starts from the older record and
// logs the rollback at error level, with the count (state.LogMetricRollbacks).
func TestRollbackAtStart(t *testing.T) {
	bin := e2e.BuildBinary(t, "./cmd/nkp-swtpm")
	dir, work := t.TempDir(), t.TempDir()
	keyFile := filepath.Join(work, "key")
	os.WriteFile(keyFile, []byte(strings.Repeat("5a", 32)), 0o600)
	spec, _ := state.ParseKeySpec("file=" + keyFile)
	key, err := state.ParseKey(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Two records of a permanent state: the first is a real TPM's (from a run), the
	// second its copy; then one bit of the newer record flips.
	run := func(extra string) (*exec.Cmd, string) {
		ctrlPath := filepath.Join(work, "ctrl")
		os.Remove(ctrlPath)
		logPath := filepath.Join(work, "log")
		os.Remove(logPath)
		cmd := exec.Command(bin, "socket", "--tpm2", "--tpmstate", "dir="+dir+extra, "--key", "file="+keyFile,
			"--flags", "not-need-init,startup-clear", "--ctrl", "type=unixio,path="+ctrlPath, "--log", "file="+logPath)
		return cmd, logPath
	}
	cmd, _ := run("")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e2e.WaitFor(t, 20*time.Second, "the first nkp-swtpm's control socket", func() bool {
		_, err := os.Stat(filepath.Join(work, "ctrl"))
		return err == nil
	})
	cmd.Process.Signal(os.Interrupt)
	cmd.Wait()
	d, err := state.Open(dir, state.Options{Key: key})
	if err != nil {
		t.Fatal(err)
	}
	perm, err := d.Load("permall")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Store("permall", append(perm[:len(perm):len(perm)], 0)); err != nil { // a second, newer record
		t.Fatal(err)
	}
	d.Close()
	p := filepath.Join(dir, state.FileName("permall"))
	f, _ := os.ReadFile(p)
	f[len(f)/2+200] ^= 1
	os.WriteFile(p, f, 0o600)

	cmd, logPath := run("")
	out, err := cmd.CombinedOutput()
	log, _ := os.ReadFile(logPath)
	if err == nil || !strings.Contains(string(out)+string(log), "accept-rollback") || !strings.Contains(string(out)+string(log), p) {
		t.Fatalf("start on a damaged newest record: %v\n%s\n%s", err, out, log)
	}
	if now, _ := os.ReadFile(p); string(now) != string(f) {
		t.Fatalf("the refused file changed")
	}

	cmd, logPath = run(",accept-rollback")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	e2e.WaitFor(t, 20*time.Second, "nkp-swtpm with accept-rollback to listen", func() bool {
		_, err := os.Stat(filepath.Join(work, "ctrl"))
		return err == nil
	})
	e2e.WaitFor(t, 5*time.Second, "the rollback in the log", func() bool {
		log, _ := os.ReadFile(logPath)
		return strings.Contains(string(log), "level=ERROR") && strings.Contains(string(log), "accept-rollback allows") &&
			strings.Contains(string(log), state.LogMetricRollbacks+"=1")
	})
}
