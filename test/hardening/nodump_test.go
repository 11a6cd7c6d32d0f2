// Package hardening holds end-to-end checks of the process hardening of nkp's
// key-holding daemons, on the real binaries.
package hardening

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// asNobody runs argv as user nobody (setpriv, no shell in between, so the process is
// the command itself).
func asNobody(argv ...string) *exec.Cmd {
	return exec.Command("setpriv", append([]string{"--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"}, argv...)...)
}

// nobodyDir returns a new directory owned by nobody, mode 0700.
func nobodyDir(t *testing.T) string {
	t.Helper()
	d := filepath.Join(t.TempDir(), "d")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Dir(d), 0o755)               // t.TempDir()'s own directory
	os.Chmod(filepath.Dir(filepath.Dir(d)), 0o755) // and the test's, both 0700
	if err := exec.Command("chown", "-R", "nobody:nogroup", d).Run(); err != nil {
		t.Fatal(err)
	}
	return d
}

// coreLimit returns /proc/PID/limits' "Max core file size" soft and hard values.
func coreLimit(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "Max core file size"); ok {
			f := strings.Fields(rest)
			if len(f) >= 2 {
				return f[0] + "/" + f[1]
			}
		}
	}
	return "?"
}

// sameUserCanRead reports whether another process of user nobody can read
// /proc/PID/environ: the kernel allows it only for dumpable processes.
func sameUserCanRead(pid int) bool {
	return asNobody("head", "-c1", fmt.Sprintf("/proc/%d/environ", pid)).Run() == nil
}

// TestKeyHoldersNotDumpable starts nkp-swtpm and nkp-provider serve as an ordinary user
// and checks from outside that each set RLIMIT_CORE to 0 and made itself non-dumpable
// (another process of the same user cannot read its /proc/PID/environ), against a
// control process of that user which can.
func TestKeyHoldersNotDumpable(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, "setpriv")
	ctl := asNobody("sleep", "60")
	if err := ctl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { ctl.Process.Kill(); ctl.Wait() }()
	e2e.WaitFor(t, 5*time.Second, "the control process as nobody", func() bool { return sameUserCanRead(ctl.Process.Pid) })
	if got := coreLimit(ctl.Process.Pid); got == "0/0" {
		t.Fatalf("the control process already has core limit %s: the check could not fail", got)
	}

	swtpm := e2e.BuildBinary(t, "./cmd/nkp-swtpm")
	provider := e2e.BuildBinary(t, "./cmd/nkp-provider")
	os.Chmod(filepath.Dir(swtpm), 0o755)

	state, run := nobodyDir(t), nobodyDir(t)
	pdir := filepath.Join(nobodyDir(t), "provider")
	if out, err := asNobody(provider, "init", "--dir", pdir, "--log-format", "text").CombinedOutput(); err != nil {
		t.Fatalf("nkp-provider init: %v\n%s", err, out)
	}
	for _, tt := range []struct {
		name  string
		argv  []string
		ready func() bool
	}{
		{"nkp-swtpm", []string{swtpm, "socket", "--tpm2", "--tpmstate", "dir=" + state, "--ctrl", "type=unixio,path=" + run + "/ctrl", "--log", "file=" + run + "/log"},
			func() bool { _, err := os.Stat(run + "/ctrl"); return err == nil }},
		{"nkp-provider serve", []string{provider, "serve", "--dir", pdir, "--listen", "127.0.0.1:0", "--log-format", "text"}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cmd := asNobody(tt.argv...)
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			pid := cmd.Process.Pid
			e2e.WaitFor(t, 20*time.Second, tt.name+" set its core limit", func() bool {
				return coreLimit(pid) == "0/0" && (tt.ready == nil || tt.ready())
			})
			if sameUserCanRead(pid) {
				t.Errorf("%s is dumpable: another process of its user read /proc/%d/environ", tt.name, pid)
			}
			if cmd.ProcessState != nil {
				t.Fatalf("%s exited: %s", tt.name, out.String())
			}
		})
	}
}
