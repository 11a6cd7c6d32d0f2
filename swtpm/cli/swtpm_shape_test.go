package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/test/e2e"
)

// laterFeatures are the features of swtpm after 0.7.1 that nkp-swtpm implements, and
// headOrder is the order swtpm HEAD's capabilities_print_json prints every feature in.
var (
	laterFeatures = []string{"flags-opt-disable-auto-shutdown", "ctrl-opt-terminate", "cmdarg-migration",
		"rsa-keysize-1024", "rsa-keysize-2048", "rsa-keysize-3072", "tpmstate-opt-lock",
		"tpmstate-dir-backend-opt-backup", "tpmstate-dir-backend-opt-fsync"}
	headOrder = []string{"tpm-1.2", "tpm-2.0", "tpm-send-command-header", "flags-opt-startup",
		"flags-opt-disable-auto-shutdown", "ctrl-opt-terminate", "cmdarg-seccomp", "cmdarg-key-fd",
		"cmdarg-pwd-fd", "cmdarg-print-states", "cmdarg-chroot", "cmdarg-migration",
		"nvram-backend-dir", "nvram-backend-file", "rsa-keysize-1024", "rsa-keysize-2048",
		"rsa-keysize-3072", "rsa-keysize-4096", "cmdarg-profile", "cmdarg-print-profiles",
		"profile-opt-remove-disabled", "cmdarg-print-info", "tpmstate-opt-lock",
		"tpmstate-dir-backend-opt-backup", "tpmstate-dir-backend-opt-fsync", "cmdarg-pcap",
		"systemd-notify"}
)

// TestPrintShapeAsSwtpm byte-compares --print-capabilities and --print-states with the
// real swtpm's: swtpm's capabilities line, taken apart and laid out again by nkp's
// formatter, must come back byte for byte; nkp's own line must be swtpm's with the
// features in Unsupported taken out and the version replaced, once the features of later
// swtpm that 0.7.1 lacks are taken out of nkp's, in swtpm's order; and --print-states of the
// same directory, or linear file, must be the same bytes from both (none, one and two
// states).
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
	// nkp's line without the features of later swtpm (nkp has them, 0.7.1 does not) must
	// be 0.7.1's without the ones nkp lacks, byte for byte, up to the version.
	drop := func(line, f string) string {
		line = strings.Replace(line, `"`+f+`", `, "", 1)
		return strings.Replace(line, `, "`+f+`"`, "", 1)
	}
	swtpmNorm := strings.Replace(string(out), `"version": "`+caps.Version+`"`, `"version": "`+Version+`"`, 1)
	for _, f := range Unsupported {
		swtpmNorm = drop(swtpmNorm, f)
	}
	var ours bytes.Buffer
	if err := PrintCapabilities(&ours); err != nil {
		t.Fatal(err)
	}
	oursNorm := ours.String()
	for _, f := range Features {
		if !slices.Contains(caps.Features, f) {
			if !slices.Contains(laterFeatures, f) {
				t.Errorf("nkp advertises %q, which neither this swtpm nor later swtpm has", f)
			}
			oursNorm = drop(oursNorm, f)
		}
	}
	if oursNorm != swtpmNorm {
		t.Errorf("--print-capabilities, normalised:\nnkp   %q\nswtpm %q", oursNorm, swtpmNorm)
	}
	// The order is swtpm's (capabilities_print_json at HEAD).
	i := 0
	for _, f := range Features {
		for i < len(headOrder) && headOrder[i] != f {
			i++
		}
		if i == len(headOrder) {
			t.Errorf("feature %q is out of swtpm's order %v", f, headOrder)
			break
		}
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

	// The linear file: missing, then swtpm's (permall and volatilestate).
	img := filepath.Join(t.TempDir(), "tpm.img")
	for _, fixture := range []string{"", "../state/testdata/swtpm-0.7.1/linear-plain/linear.img"} {
		if fixture != "" {
			b, err := os.ReadFile(fixture)
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(img, b, 0o600)
		}
		var got bytes.Buffer
		if err := printStates(&cmdline.Options{State: &cmdline.StateOptions{File: img}}, &got); err != nil {
			t.Fatal(err)
		}
		// swtpm creates and formats a missing file here; nkp does not write on a probe.
		want, err := exec.Command("swtpm", "socket", "--tpm2", "--print-states", "--tpmstate", "backend-uri=file://"+img).Output()
		if err != nil {
			t.Fatal(err)
		}
		if got.String() != string(want) {
			t.Errorf("--print-states of a linear file:\nnkp   %q\nswtpm %q", got.String(), want)
		}
	}
}
