package vtpmproc_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

func TestMain(m *testing.M) { e2e.Main(m) }

// TestStartStop runs both backends through the launcher: they listen on the sockets
// the command line names, stop cleanly on Stop (exit 0, sockets removed) and a bad
// command line ends the wait at once with ErrExited.
func TestStartStop(t *testing.T) {
	for _, get := range []func(testing.TB) vtpmproc.Backend{vtpmproc.SwtpmFor, vtpmproc.NKPSwtpmFor} {
		be := get(t)
		t.Run(be.Name, func(t *testing.T) {
			dir := t.TempDir()
			ctrl, data := filepath.Join(dir, "c.sock"), filepath.Join(dir, "d.sock")
			var out bytes.Buffer
			p := vtpmproc.StartT(t, be, vtpmproc.Options{
				Args: cmdline.Options{
					TPM2:   true,
					Ctrl:   &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: ctrl, Mode: 0o600},
					Server: &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: data, Mode: 0o600},
					State:  &cmdline.StateOptions{Dir: dir, Mode: 0o600},
					Flags:  cmdline.FlagsOptions{NotNeedInit: true, Startup: cmdline.StartupClear},
				},
				Dir:    dir,
				Output: &out,
			})
			if err := p.WaitListening(30*time.Second, "unix:"+ctrl, data); err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			if err := p.WaitListening(50*time.Millisecond, filepath.Join(dir, "never.sock")); err == nil || errors.Is(err, vtpmproc.ErrExited) || !strings.Contains(err.Error(), "never.sock") {
				t.Errorf("WaitListening on a socket nobody opens: %v, want a timeout naming it", err)
			}
			if err := p.Stop(10 * time.Second); err != nil {
				t.Fatalf("Stop: %v\n%s", err, out.String())
			}
			for _, s := range []string{ctrl, data} {
				if _, err := os.Stat(s); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there after a clean stop (%v)", s, err)
				}
			}

			bad := vtpmproc.StartT(t, be, vtpmproc.Options{
				Args:  cmdline.Options{TPM2: true, Ctrl: &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: ctrl}},
				Extra: []string{"--no-such-option"},
			})
			start := time.Now()
			if err := bad.WaitListening(30*time.Second, ctrl); !errors.Is(err, vtpmproc.ErrExited) {
				t.Fatalf("WaitListening with a refused command line: %v, want ErrExited", err)
			}
			if time.Since(start) > 10*time.Second || bad.Err() == nil {
				t.Errorf("refused command line: waited %v, exit error %v; want a prompt non-zero exit", time.Since(start), bad.Err())
			}
		})
	}
}

func TestStartRefusesBadOptions(t *testing.T) {
	_, err := vtpmproc.Start(vtpmproc.Backend{Name: "x", Path: "/bin/true"}, vtpmproc.Options{Args: cmdline.Options{Ctrl: &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: "/s"}}})
	if err == nil || !strings.Contains(err.Error(), "--tpm2") {
		t.Fatalf("Start without TPM2: %v, want cmdline's refusal", err)
	}
	_, err = vtpmproc.Start(vtpmproc.Backend{Name: "missing", Path: "/nonexistent/prog"}, vtpmproc.Options{Args: cmdline.Options{TPM2: true}})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/prog") {
		t.Fatalf("Start of a missing program: %v, want an error naming it", err)
	}
}

// TestStartHostTPM: both backends serve as a host TPM on the two sockets the spec names,
// and a backend that cannot serve is reported with nothing left running.
func TestStartHostTPM(t *testing.T) {
	for _, get := range []func(testing.TB) vtpmproc.Backend{vtpmproc.SwtpmFor, vtpmproc.NKPSwtpmFor} {
		be := get(t)
		t.Run(be.Name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "tpm")
			tpm, err := vtpmproc.StartHostTPM(be, dir, nil, 30*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer tpm.Kill()
			if want := "swtpm:path=" + filepath.Join(dir, "data.sock") + ",ctrl=" + filepath.Join(dir, "ctrl.sock"); tpm.Spec() != want {
				t.Errorf("Spec() = %q, want %q", tpm.Spec(), want)
			}
			if !vtpmproc.Dialable(tpm.Data) {
				t.Errorf("the data socket %s does not accept", tpm.Data)
			}
		})
	}
	tpm, err := vtpmproc.StartHostTPM(vtpmproc.Backend{Name: "true", Path: "/bin/true"}, filepath.Join(t.TempDir(), "tpm"), nil, 30*time.Second)
	if err == nil || !errors.Is(err, vtpmproc.ErrExited) {
		t.Fatalf("StartHostTPM of /bin/true = %v, %v; want ErrExited", tpm, err)
	}
}
