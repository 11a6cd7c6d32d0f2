package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestPrintShapeAsSwtpm byte-compares the --print-capabilities and --print-states
// layout with the real swtpm's: swtpm's capabilities line, taken apart and laid out
// again by nkp's formatter, must come back byte for byte; and --print-states of the same
// directory must be the same bytes from both (none, one and two states).
func TestPrintShapeAsSwtpm(t *testing.T) {
	e2e.Require(t, "swtpm")
	out, err := exec.Command("swtpm", "socket", "--tpm2", "--print-capabilities").Output()
	if err != nil {
		t.Fatal(err)
	}
	var caps Capabilities
	if err := json.Unmarshal(out, &caps); err != nil {
		t.Fatalf("swtpm's capabilities: %v: %q", err, out)
	}
	if got := formatCapabilities(caps.Features, caps.Version); got != string(out) {
		t.Errorf("nkp's layout of swtpm's capabilities:\n%q\nswtpm's:\n%q", got, out)
	}

	dir := t.TempDir()
	fixture := "../state/testdata/swtpm-0.7.1/plain"
	for _, files := range [][]string{nil, {"tpm2-00.permall"}, {"tpm2-00.volatilestate"}} {
		for _, f := range files {
			b, err := os.ReadFile(filepath.Join(fixture, f))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(dir, f), b, 0o600)
		}
		want, err := exec.Command("swtpm", "socket", "--tpm2", "--print-states", "--tpmstate", "dir="+dir).Output()
		if err != nil {
			t.Fatal(err)
		}
		var got bytes.Buffer
		if err := printStates(&cmdline.Options{State: &cmdline.StateOptions{Dir: dir}}, &got); err != nil {
			t.Fatal(err)
		}
		if got.String() != string(want) {
			t.Errorf("--print-states:\nnkp   %q\nswtpm %q", got.String(), want)
		}
	}
}
