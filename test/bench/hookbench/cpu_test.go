package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestParseBusy(t *testing.T) {
	tests := []struct {
		name string
		stat string
		want time.Duration
		err  string
	}{
		{"busy fields only, idle and iowait left out", "cpu  100 2 30 9999 77 4 5 6 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n", 147 * 10 * time.Millisecond, ""},
		{"not the totals first", "cpu0 1 2 3 4 5 6 7 8\n", 0, "not the cpu totals"},
		{"too short", "cpu 1 2 3\n", 0, "not the cpu totals"},
		{"garbled", "cpu 1 x 3 4 5 6 7 8\n", 0, "field 2"},
	}
	for _, tt := range tests {
		got, err := parseBusy([]byte(tt.stat))
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s: error %v, want one with %q", tt.name, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: %v, %v; want %v", tt.name, got, err, tt.want)
		}
	}
}

func TestParseSchedstat(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"240128962 66197593 1284\n", 240128962, true},
		{"0 52188 1", 0, true},
		{"12 34", 0, false},
		{"x 1 2", 0, false},
	}
	for _, tt := range tests {
		got, err := parseSchedstat([]byte(tt.in))
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseSchedstat(%q) = %v, %v; want %v (ok %v)", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// TestProcessCPU reads this test process's own threads: more than nothing, and it grows
// when the process works.
func TestProcessCPU(t *testing.T) {
	before, err := processCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	x := 0
	for t0 := time.Now(); time.Since(t0) < 30*time.Millisecond; {
		x++
	}
	after, err := processCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if before <= 0 || after-before < 10*time.Millisecond {
		t.Errorf("processCPU: %v, then %v after 30 ms of spinning (%d turns): want it to grow by ≥ 10 ms", before, after, x)
	}
	if _, err := processCPU(1 << 30); err == nil {
		t.Error("processCPU of a pid that does not exist: no error")
	}
}
