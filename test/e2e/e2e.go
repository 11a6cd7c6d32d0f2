// Package e2e holds the one rule every end-to-end test under test/ follows: a test that
// needs a real tool skips with a clear reason when the tool is missing, unless
// NKP_E2E=required (CI sets it), where a missing tool fails the test.
package e2e

import (
	"os"
	"os/exec"
	"testing"
)

// Required reports whether NKP_E2E=required is set, making missing tools failures.
func Required() bool { return os.Getenv("NKP_E2E") == "required" }

// Require skips (or, under NKP_E2E=required, fails) t unless every tool is on PATH.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if Required() {
				t.Fatalf("%s not found on PATH and NKP_E2E=required: install it (bash test/setup.sh)", tool)
			}
			t.Skipf("%s not found on PATH: install it (bash test/setup.sh) or set NKP_E2E=required to make this a failure", tool)
		}
	}
}
