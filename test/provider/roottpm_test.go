package provider_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/vtpmproc"
)

// startSwtpm runs Debian's swtpm as a TPM 2.0 on a unix data socket, initialised at
// start (no control-channel INIT needed), and returns "swtpm:path=SOCKET".
func startSwtpm(t *testing.T, name string) string {
	t.Helper()
	return "swtpm:path=" + vtpmproc.HostTPMT(t, vtpmproc.SwtpmFor(t), filepath.Join(t.TempDir(), name)).Data
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
