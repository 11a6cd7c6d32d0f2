package envelope

import (
	"bytes"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// startSwtpm runs Debian's swtpm on a fresh state directory with the extra options and
// returns its control socket. The process is shut down at the end of the test.
func startSwtpm(t *testing.T, extra ...string) string {
	t.Helper()
	dir := t.TempDir()
	ctrl := filepath.Join(dir, "ctrl")
	args := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir,
		"--ctrl", "type=unixio,path=" + ctrl, "--log", "file=" + filepath.Join(dir, "log")}, extra...)
	cmd := exec.Command("swtpm", args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = exec.Command("swtpm_ioctl", "--unix", ctrl, "-s").Run()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	// Listening, not only bound: a connect between swtpm's bind and listen is refused
	// (swtpm serves its control socket to one client after another, so a probe is fine).
	e2e.WaitFor(t, 5*time.Second, "swtpm control socket "+ctrl, func() bool {
		c, err := net.Dial("unix", ctrl)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return ctrl
}

func ioctl(t *testing.T, ctrl string, args ...string) error {
	t.Helper()
	out, err := exec.Command("swtpm_ioctl", append([]string{"--unix", ctrl}, args...)...).CombinedOutput()
	if err != nil {
		t.Logf("swtpm_ioctl %v: %v: %s", args, err, out)
	}
	return err
}

// TestSwtpmExchange moves a permanent-state blob from a real swtpm to nkp's decoder and
// back into a second real swtpm through nkp's encoder (swtpm_ioctl --save/--load), with
// and without a migration key and a state-key layer, and checks that swtpm refuses a blob
// made with the wrong key.
func TestSwtpmExchange(t *testing.T) {
	e2e.Require(t, "swtpm", "swtpm_ioctl")
	keyHex := "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	mk, _ := hex.DecodeString(keyHex)
	keyFile := filepath.Join(t.TempDir(), "mig.hex")
	if err := os.WriteFile(keyFile, []byte(keyHex), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		key      []byte // migration key
		stateKey []byte // state key, for a blob that keeps the state-key layer
		opts     []string
	}{
		{"plain", nil, nil, nil},
		{"migration key", mk, nil, []string{"--migration-key", "file=" + keyFile + ",mode=aes-256-cbc"}},
		{"state key layer", nil, mk, []string{"--key", "file=" + keyFile + ",mode=aes-256-cbc"}},
		{"both layers", mk, mk, []string{"--key", "file=" + keyFile + ",mode=aes-256-cbc",
			"--migration-key", "file=" + keyFile + ",mode=aes-256-cbc"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			src := startSwtpm(t, append([]string{"--flags", "not-need-init,startup-clear"}, tt.opts...)...)
			fromSwtpm := filepath.Join(dir, "from-swtpm")
			if err := ioctl(t, src, "--save", "permanent", fromSwtpm); err != nil {
				t.Fatal("swtpm --save failed")
			}
			blob, _ := os.ReadFile(fromSwtpm)
			payload, err := FromMigration(blob, 0, tt.key, nil)
			if err != nil || len(payload) == 0 {
				t.Fatalf("nkp cannot read swtpm's blob: %v", err)
			}

			ours, _, err := ForMigrationWithStateKey(payload, tt.key, tt.stateKey, tt.stateKey == nil)
			if err != nil {
				t.Fatal(err)
			}
			ourFile := filepath.Join(dir, "from-nkp")
			if err := os.WriteFile(ourFile, ours, 0o600); err != nil {
				t.Fatal(err)
			}
			dst := startSwtpm(t, tt.opts...)
			if err := ioctl(t, dst, "--load", "permanent", ourFile); err != nil {
				t.Fatal("swtpm refused nkp's blob (--load)")
			}
			if err := ioctl(t, dst, "-i"); err != nil {
				t.Fatal("swtpm could not INIT with nkp's blob")
			}
			back := filepath.Join(dir, "back")
			if err := ioctl(t, dst, "--save", "permanent", back); err != nil {
				t.Fatal("swtpm --save after load failed")
			}
			blob2, _ := os.ReadFile(back)
			payload2, err := FromMigration(blob2, 0, tt.key, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(payload2, payload) {
				t.Errorf("the TPM that loaded nkp's blob has different permanent state (%d vs %d bytes)", len(payload2), len(payload))
			}

			if tt.key != nil || tt.stateKey != nil {
				other := func(k []byte) []byte {
					if k == nil {
						return nil
					}
					return bytes.Repeat([]byte{7}, 32)
				}
				wrong, _, _ := ForMigrationWithStateKey(payload, other(tt.key), other(tt.stateKey), tt.stateKey == nil)
				wrongFile := filepath.Join(dir, "wrong")
				_ = os.WriteFile(wrongFile, wrong, 0o600)
				third := startSwtpm(t, tt.opts...)
				if err := ioctl(t, third, "--load", "permanent", wrongFile); err == nil {
					t.Errorf("swtpm accepted a blob made with another key")
				}
			}
		})
	}
}
