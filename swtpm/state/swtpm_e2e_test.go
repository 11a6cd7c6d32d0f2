package state

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

	got := swtpmPermall(t, []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir}) // INIT loads tpm2-00.permall as nkp wrote it
	if !bytes.Equal(got, ref) {
		t.Errorf("swtpm's permanent state (%d bytes) differs from what nkp stored (%d bytes)", len(got), len(ref))
	}
}

// TestSwtpmReadsLegacyFixtures is the differential check of the header-less fixtures:
// swtpm 0.7.1 itself, given each fixture directory and its --key option, initialises
// the TPM from it (INIT reads permall and volatilestate) and hands back the reference
// permanent state. So the fixtures are files swtpm really reads, not only nkp.
func TestSwtpmReadsLegacyFixtures(t *testing.T) {
	e2e.Require(t, "swtpm", "swtpm_ioctl")
	perm, _ := legacyPayloads(t)
	for _, c := range legacyCases {
		t.Run(c.dir, func(t *testing.T) {
			dir := copyFixtureFrom(t, legacyFixtures, c.dir)
			args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir}
			if c.key != "" {
				abs, err := filepath.Abs("testdata")
				if err != nil {
					t.Fatal(err)
				}
				args = append(args, "--key", strings.ReplaceAll(c.key, "file=", "file="+abs+"/"))
			}
			got := swtpmPermall(t, args)
			if !bytes.Equal(got, perm) {
				t.Errorf("swtpm's permanent state (%d bytes) differs from the reference (%d bytes)", len(got), len(perm))
			}
		})
	}
}

// swtpmPermall starts swtpm with args (plus a control socket and a log), sends INIT and
// returns the permanent state it then holds (GET_STATEBLOB, decrypted).
func swtpmPermall(t *testing.T, args []string) []byte {
	t.Helper()
	work := t.TempDir()
	ctrl := filepath.Join(work, "ctrl")
	logf := filepath.Join(work, "log")
	cmd := exec.Command("swtpm", append(args, "--ctrl", "type=unixio,path="+ctrl, "--log", "file="+logf)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = exec.Command("swtpm_ioctl", "--unix", ctrl, "-s").Run()
		select {
		case <-exited:
		case <-time.After(10 * time.Second): // a swtpm that does not answer must not hang the run
			cmd.Process.Kill()
			<-exited
		}
	})
	// Listening, not only bound: a connect between swtpm's bind and listen is refused.
	e2e.WaitFor(t, 5*time.Second, "swtpm's control socket", func() bool {
		c, err := net.Dial("unix", ctrl)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	ioctl := func(args ...string) {
		t.Helper()
		out, err := exec.Command("swtpm_ioctl", append([]string{"--unix", ctrl}, args...)...).CombinedOutput()
		if err != nil {
			log, _ := os.ReadFile(logf)
			t.Fatalf("swtpm_ioctl %v: %v: %s\nswtpm log:\n%s", args, err, out, log)
		}
	}
	ioctl("-i")
	saved := filepath.Join(work, "permall")
	ioctl("--save", "permanent", saved)
	blob, _ := os.ReadFile(saved)
	got, err := envelope.FromMigration(blob, 0, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestSwtpmReadsOurLinear: a linear state file that nkp wrote — blobs moved around by
// stores of growing and shrinking size, so that the sections sit where nkp placed them
// with space between — is one real swtpm initialises its TPM from, with and without a
// key, handing back the permanent state nkp stored. swtpm's own linear files loading in
// nkp are TestLinearSwtpmFixtures.
func TestSwtpmReadsOurLinear(t *testing.T) {
	e2e.Require(t, "swtpm", "swtpm_ioctl")
	for _, tt := range []struct {
		fixture string
		keyOpt  string
	}{{"linear-plain", ""}, {"linear-key256", "file=" + fixtures + "/key256.hex,mode=aes-256-cbc"}} {
		t.Run(tt.fixture, func(t *testing.T) {
			ref, err := os.ReadFile(filepath.Join(fixtures, tt.fixture, "ref.permall"))
			if err != nil {
				t.Fatal(err)
			}
			var opts Options
			args := []string{"socket", "--tpm2"}
			if tt.keyOpt != "" {
				abs, _ := filepath.Abs(".")
				spec, _ := ParseKeySpec("file=" + filepath.Join(fixtures, "key256.hex"))
				k, err := ParseKey(spec, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer k.Wipe()
				opts.Key = k
				args = append(args, "--key", "file="+filepath.Join(abs, fixtures, "key256.hex")+",mode=aes-256-cbc")
			}
			p := filepath.Join(t.TempDir(), "tpm.img")
			l := mustOpenLinear(t, p, opts)
			for _, s := range []struct {
				name string
				data []byte
			}{
				{"permall", bytes.Repeat([]byte{1}, 200)},
				{"savestate", bytes.Repeat([]byte{2}, 3000)},
				{"permall", bytes.Repeat([]byte{3}, 5000)},
				{"permall", ref},
			} {
				if err := l.Store(s.name, s.data); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Delete("savestate"); err != nil {
				t.Fatal(err)
			}
			l.Close()
			got := swtpmPermall(t, append(args, "--tpmstate", "backend-uri=file://"+p))
			if !bytes.Equal(got, ref) {
				t.Errorf("swtpm's permanent state (%d bytes) differs from what nkp stored (%d bytes)", len(got), len(ref))
			}
		})
	}
}
