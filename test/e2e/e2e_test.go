package e2e

import (
	"runtime"
	"testing"
)

func TestRequire(t *testing.T) {
	tests := []struct {
		name     string
		tool     string
		required string
		want     string // "pass", "skip" or "fail"
	}{
		{"present", "sh", "", "pass"},
		{"missing skips", "nkp-no-such-tool", "", "skip"},
		{"missing fails when required", "nkp-no-such-tool", "required", "fail"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("NKP_E2E", tc.required)
			got := "pass"
			done := make(chan struct{})
			rec := &recorder{TB: t}
			go func() {
				defer close(done)
				defer func() {
					if rec.skipped {
						got = "skip"
					} else if rec.failed {
						got = "fail"
					}
				}()
				Require(rec, tc.tool)
			}()
			<-done
			if got != tc.want {
				t.Fatalf("Require(%q) with NKP_E2E=%q: %s, want %s", tc.tool, tc.required, got, tc.want)
			}
		})
	}
}

// recorder notes Skip and Fatal instead of acting on them; it ends the goroutine the way
// testing does.
type recorder struct {
	testing.TB
	skipped, failed bool
}

func (r *recorder) Helper() {}
func (r *recorder) Skipf(string, ...any) {
	r.skipped = true
	runtime.Goexit()
}
func (r *recorder) Fatalf(string, ...any) {
	r.failed = true
	runtime.Goexit()
}
