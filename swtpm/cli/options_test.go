package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPrintCapabilities(t *testing.T) {
	var buf bytes.Buffer
	if err := PrintCapabilities(&buf); err != nil {
		t.Fatal(err)
	}
	var caps Capabilities
	if err := json.Unmarshal(buf.Bytes(), &caps); err != nil {
		t.Fatalf("not JSON: %v: %s", err, buf.String())
	}
	if caps.Type != "swtpm" || caps.Version != Version {
		t.Errorf("type %q version %q, want swtpm and %s", caps.Type, caps.Version, Version)
	}
	have := map[string]bool{}
	for _, f := range caps.Features {
		have[f] = true
	}
	// What libvirt 9.0 and swtpm_setup look for, and what nkp must not claim.
	for f, want := range map[string]bool{
		"tpm-2.0": true, "cmdarg-pwd-fd": true, "cmdarg-key-fd": true, "cmdarg-migration": true,
		"cmdarg-print-states": true, "tpmstate-opt-lock": true, "rsa-keysize-2048": true,
		"rsa-keysize-3072": true, "tpm-send-command-header": true, "flags-opt-startup": true,
		"flags-opt-disable-auto-shutdown": true, "ctrl-opt-terminate": true, "nvram-backend-dir": true,
		"cmdarg-seccomp": true, "tpm-1.2": false, "nvram-backend-file": true, "cmdarg-chroot": false,
	} {
		if have[f] != want {
			t.Errorf("feature %q present = %v, want %v", f, have[f], want)
		}
	}
}

func TestPrintStates(t *testing.T) {
	tests := []struct {
		states []StateEntry
		want   string
	}{
		{nil, `{ "type": "swtpm", "states": [] }`},
		{[]StateEntry{{"permall", 1234}}, `{ "type": "swtpm", "states": [ {"name": "permall", "size": 1234} ] }`},
		{[]StateEntry{{"permall", 1315}, {"volatilestate", 8986}},
			`{ "type": "swtpm", "states": [ {"name": "permall", "size": 1315}, {"name": "volatilestate", "size": 8986} ] }`},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		if err := PrintStates(&buf, tt.states); err != nil {
			t.Fatal(err)
		}
		if buf.String() != tt.want {
			t.Errorf("PrintStates(%v) = %q, want %q", tt.states, buf.String(), tt.want)
		}
		var v struct{ States []StateEntry }
		if err := json.Unmarshal(buf.Bytes(), &v); err != nil || len(v.States) != len(tt.states) {
			t.Errorf("not the JSON it stands for: %v", err)
		}
	}
}

func TestMainModes(t *testing.T) {
	states := t.TempDir()
	if err := os.WriteFile(filepath.Join(states, "tpm2-00.permall"), []byte("abc"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{nil, 1, "", "Usage: nkp-swtpm socket"},
		{[]string{"--version"}, 0, "nkp-swtpm version " + Version, ""},
		{[]string{"socket", "--help"}, 0, "--tpmstate dir=", ""},
		{[]string{"socket", "--print-capabilities"}, 0, `{ "type": "swtpm", "features": [ "tpm-2.0", `, ""},
		{[]string{"chardev", "--tpm2"}, 1, "", `mode "chardev" is not supported`},
		{[]string{"cuse"}, 1, "", "not supported"},
		{[]string{"frobnicate"}, 1, "", `unknown mode "frobnicate"`},
		// swtpm's sentence, which scripts grep for to tell that an interface is missing.
		{[]string{"chardev", "--help"}, 1, "", "Unsupported TPM interface type 'chardev'."},
		{[]string{"cuse", "--help"}, 1, "", "Unsupported TPM interface type 'cuse'."},
		{[]string{"frobnicate"}, 1, "", "Unsupported TPM interface type 'frobnicate'."},
		{[]string{"socket", "--tpm2", "--nope"}, 1, "", "unknown option --nope"},
		{[]string{"socket", "--ctrl", "type=unixio,path=/x"}, 1, "", "add --tpm2"},
		{[]string{"socket", "--tpm2", "--print-states"}, 1, "", "--print-states needs --tpmstate"},
		{[]string{"socket", "--tpm2", "--print-states", "--tpmstate", "dir=" + states}, 0, `{ "type": "swtpm", "states": [ {"name": "permall", "size": 3} ] }`, ""},
		{[]string{"socket", "--tpm2", "--print-states", "--tpmstate", "dir=" + filepath.Join(states, "tpm2-00.permall")}, 1, "", "not a directory"},
		{[]string{"socket", "--tpm2", "--ctrl", "type=unixio,path=" + filepath.Join(states, "c")}, 1, "", "no state directory"},
		{[]string{"socket", "--tpm2", "--tpmstate", "dir=" + states}, 1, "", "no channel to serve"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			t.Setenv("TPM_PATH", "")
			var out, errb bytes.Buffer
			code := Main(tt.args, &out, &errb)
			if code != tt.wantCode {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tt.wantCode, errb.String())
			}
			if !strings.Contains(out.String(), tt.wantStdout) {
				t.Errorf("stdout %q, want it to contain %q", out.String(), tt.wantStdout)
			}
			if !strings.Contains(errb.String(), tt.wantStderr) {
				t.Errorf("stderr %q, want it to contain %q", errb.String(), tt.wantStderr)
			}
		})
	}
}
