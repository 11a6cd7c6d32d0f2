package provider_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/e2e"
)

// startSwtpm runs Debian's swtpm as a TPM 2.0 on a unix data socket, initialised at
// start (no control-channel INIT needed), and returns "swtpm:path=SOCKET".
func startSwtpm(t *testing.T, name string) string {
	t.Helper()
	e2e.Require(t, "swtpm")
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data.sock")
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", "type=unixio,path="+data, "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"),
		"--flags", "not-need-init,startup-clear")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(data); err == nil {
			return "swtpm:path=" + data
		}
		select {
		case <-exited:
			t.Fatalf("swtpm %s exited before listening: %s", name, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm %s: no data socket within 20 s: %s", name, logs.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for the socket, bounded by deadline
	}
}

// TestRootKeyTPM: `nkp-provider init --root-key-tpm` seals the root key to the provider
// host's TPM (Debian's swtpm here); serve unseals it with that TPM and works, and fails
// with a clear error against another TPM or without the flag.
func TestRootKeyTPM(t *testing.T) {
	b := build(t)
	mine := startSwtpm(t, "mine")
	other := startSwtpm(t, "other")
	dir := b.initProvider(t, "--root-key-tpm", mine)
	raw, err := os.ReadFile(filepath.Join(dir, "root.key"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(raw, []byte("nkp-rootkey-tpm-v1\n")) {
		t.Fatalf("root.key after init --root-key-tpm is not TPM-sealed (starts %q)", raw[:min(len(raw), 20)])
	}

	refusals := []struct {
		name string
		args []string
		want string
	}{
		{"without the flag", nil, "--root-key-tpm"},
		{"another TPM", []string{"--root-key-tpm", other}, "does not unseal it"},
		{"a missing socket", []string{"--root-key-tpm", "swtpm:path=" + filepath.Join(t.TempDir(), "none")}, "is swtpm running"},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve", "--dir", dir, "--listen", "127.0.0.1:0", "--log-format", "text"}, tc.args...)
			out, err := exec.Command(b.provider, args...).CombinedOutput()
			if err == nil || !strings.Contains(string(out), tc.want) {
				t.Fatalf("serve %v: err %v, output %q; want a refusal saying %q", tc.args, err, out, tc.want)
			}
		})
	}

	s := b.serve(t, dir, "--root-key-tpm", mine)
	b.backUp(t, dir, s.url)
	var st apiv1.Status
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "Active" {
		t.Fatalf("state after a backup on a TPM-sealed provider: %s", st.State)
	}
	s.stop(t)
	// A plain-key provider refuses the flag rather than misreading its key.
	plain := b.initProvider(t)
	out, err := exec.Command(b.provider, "serve", "--dir", plain, "--listen", "127.0.0.1:0", "--log-format", "text", "--root-key-tpm", mine).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "leave --root-key-tpm out") {
		t.Fatalf("serve of a plain-key provider with --root-key-tpm: %v, %q", err, out)
	}
}
