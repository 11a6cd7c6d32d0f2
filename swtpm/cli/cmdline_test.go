package cli

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/swtpm/ctrl"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestBuiltCommandLineServes starts the real nkp-swtpm with the command line that
// cmdline.Build writes for the vTPM hostd runs (control socket 0660, state 0600, a raw
// AES-256-GCM key on fd 3): it serves, the socket and the state files get the modes
// asked for, and the state is not plaintext.
func TestBuiltCommandLineServes(t *testing.T) {
	bin := e2e.BuildBinary(t, "./cmd/nkp-swtpm")
	dir := t.TempDir()
	sock, stateDir := filepath.Join(dir, "ctrl.sock"), filepath.Join(dir, "state")
	if err := os.Mkdir(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	o := &cmdline.Options{
		TPM2:  true,
		Ctrl:  &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: sock, Mode: 0o660},
		State: &cmdline.StateOptions{Dir: stateDir, Mode: 0o600},
		Key:   &cmdline.KeyOptions{FD: 3, Format: cmdline.FormatBinary, Mode: "aes-256-gcm"},
		Log:   &cmdline.LogOptions{File: filepath.Join(dir, "log")},
	}
	args, err := cmdline.Build(o)
	if err != nil {
		t.Fatal(err)
	}
	if got := o.InheritedFDs(); len(got) != 1 || got[0] != 3 {
		t.Fatalf("InheritedFDs = %v, want [3]", got)
	}
	keyR, keyW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	key := bytes.Repeat([]byte{0x5a}, 32)
	if _, err := keyW.Write(key); err != nil {
		t.Fatal(err)
	}
	keyW.Close()
	cmd := exec.Command(bin, append([]string{"socket"}, args...)...)
	cmd.ExtraFiles = []*os.File{keyR}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	keyR.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})

	c := dialCtrl(t, sock)
	ctrlCommand(t, c, ctrl.Init{}, 4)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("control socket: %v, mode %v; want 0660", err, fi.Mode().Perm())
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		done <- err
		if err != nil {
			t.Fatalf("nkp-swtpm %q after SIGTERM: %v\n%s", args, err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("nkp-swtpm did not exit within 10 s of SIGTERM")
	}
	permall := filepath.Join(stateDir, "tpm2-00.permall")
	fi, err := os.Stat(permall)
	if err != nil {
		t.Fatalf("no state after a clean stop: %v\n%s", err, stderr.String())
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s mode %v, want 0600", permall, fi.Mode().Perm())
	}
	b, err := os.ReadFile(permall)
	if err != nil {
		t.Fatal(err)
	}
	// libtpms' permanent state holds its magic (ab 36 47 23) after a version when
	// plaintext, in the file or after a swtpm blob header.
	if bytes.Contains(b, []byte{0xab, 0x36, 0x47, 0x23}) {
		t.Errorf("%s holds libtpms' plaintext magic: the key from fd 3 was not used", permall)
	}
}
