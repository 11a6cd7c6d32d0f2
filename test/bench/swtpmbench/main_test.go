package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

func TestPercentile(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		q      float64
		want   time.Duration
	}{
		{"empty", nil, 0.5, 0},
		{"one", ms(7), 0.99, 7 * time.Millisecond},
		{"median odd", ms(1, 2, 3, 4, 5), 0.5, 3 * time.Millisecond},
		{"median even takes the lower", ms(1, 2, 3, 4), 0.5, 2 * time.Millisecond},
		{"p99 of 100", ms(func() []int {
			v := make([]int, 100)
			for i := range v {
				v[i] = i + 1
			}
			return v
		}()...), 0.99, 99 * time.Millisecond},
		{"max", ms(1, 2, 3), 1, 3 * time.Millisecond},
	}
	for _, tc := range tests {
		if got := percentile(tc.sorted, tc.q); got != tc.want {
			t.Errorf("%s: percentile(q=%v) = %v, want %v", tc.name, tc.q, got, tc.want)
		}
	}
}

func TestParseSmapsRollup(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    memory
		wantErr bool
	}{
		{"real", "55d6e4a1e000-7ffd5b5f1000 ---p 00000000 00:00 0    [rollup]\nRss:                6740 kB\nPss:                1713 kB\nPss_Anon:            640 kB\n", memory{RSS: 6740, PSS: 1713}, false},
		{"no pss", "Rss: 10 kB\n", memory{}, true},
		{"garbage", "Rss: ten kB\nPss: 1 kB\n", memory{}, true},
		{"empty", "", memory{}, true},
	}
	for _, tc := range tests {
		got, err := parseSmapsRollup([]byte(tc.in))
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("%s: parseSmapsRollup = %+v, %v; want %+v, error %v", tc.name, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestParseSchedstat(t *testing.T) {
	tests := []struct {
		in      string
		want    time.Duration
		wantErr bool
	}{
		{"7358696 2849547 39\n", 7358696 * time.Nanosecond, false},
		{"0 0 0", 0, false},
		{"", 0, true},
		{"-5 1 1", 0, true},
		{"abc 1 1", 0, true},
	}
	for _, tc := range tests {
		got, err := parseSchedstat([]byte(tc.in))
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("parseSchedstat(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestRowVerdict(t *testing.T) {
	tests := []struct {
		r         row
		ratio     string
		verdict   string
		formatted string
	}{
		{row{a: 100, b: 50, unit: "µs", target: 0.7}, "0.50", "≤ 0.7 ✓", "50.0 µs"},
		{row{a: 100, b: 80, unit: "µs", target: 0.7}, "0.80", "≤ 0.7 ✗", "80.0 µs"},
		{row{a: 2, b: 2, unit: "ms", target: 1}, "1.00", "≤ 1.0 ✓", "2.00 ms"},
		{row{a: 6000, b: 9000, unit: "KiB"}, "1.50", "—", "9000 KiB"},
		{row{a: 0, b: 1, unit: "ms", target: 1}, "n/a", "n/a", "1.00 ms"},
	}
	for _, tc := range tests {
		if got := tc.r.ratio(); got != tc.ratio {
			t.Errorf("%+v: ratio %q, want %q", tc.r, got, tc.ratio)
		}
		if got := tc.r.verdict(); got != tc.verdict {
			t.Errorf("%+v: verdict %q, want %q", tc.r, got, tc.verdict)
		}
		if got := formatValue(tc.r.b, tc.r.unit); got != tc.formatted {
			t.Errorf("%+v: formatValue %q, want %q", tc.r, got, tc.formatted)
		}
	}
}

// Several runs combine into medians; the verdict is taken on the median ratio.
func TestCombineRuns(t *testing.T) {
	rep := func(a, b float64) report {
		r := report{cfg: config{Starts: 1, Idle: 1}}
		r.a.mem = []memory{{PSS: int64(a)}}
		r.b.mem = []memory{{PSS: int64(b)}}
		return r
	}
	tests := []struct {
		name      string
		runs      []report
		wantRatio string
		wantEach  string
		wantOK    bool
	}{
		{"one run", []report{rep(100, 90)}, "0.90", "0.90", true},
		{"median of three, one outlier", []report{rep(100, 90), rep(100, 300), rep(100, 95)}, "0.95", "0.90, 3.00, 0.95", true},
		{"even count averages the middle", []report{rep(100, 110), rep(100, 140)}, "1.25", "1.10, 1.40", false},
	}
	for _, tt := range tests {
		var pss combined
		for _, c := range combineRuns(tt.runs) {
			if strings.HasPrefix(c.name, "PSS") {
				pss = c
			}
		}
		if pss.ratio != tt.wantRatio || strings.Join(pss.each, ", ") != tt.wantEach || strings.HasSuffix(pss.verdict, "✓") != tt.wantOK {
			t.Errorf("%s: PSS ratio %s, each %v, verdict %q; want %s, %s, ok %v", tt.name, pss.ratio, pss.each, pss.verdict, tt.wantRatio, tt.wantEach, tt.wantOK)
		}
	}
}

func TestFlagsRefused(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-n", "0"}, "-n 0"},
		{[]string{"-key", "argv"}, "-key"},
		{[]string{"-a", "/nonexistent/swtpm"}, "-a /nonexistent/swtpm"},
		{[]string{"stray"}, "unexpected arguments"},
		{[]string{"-cpus", "one"}, "-cpus"},
		{[]string{"-block", "0"}, "-block"},
		{[]string{"-cpus", "0,-1"}, "-cpus"},
	}
	for _, tc := range tests {
		_, err := parseFlags(tc.args, new(strings.Builder))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseFlags(%q) = %v, want an error naming %q", tc.args, err, tc.want)
		}
	}
}

// TestBenchSwtpmAgainstItself runs the whole benchmark, small, with Debian's
// swtpm on both sides: the calibration run. Ratios must be finite and every
// measure non-zero.
func TestBenchSwtpmAgainstItself(t *testing.T) {
	e2e.Require(t, "swtpm")
	out := filepath.Join(t.TempDir(), "bench.md")
	var table strings.Builder
	args := []string{"-a", "swtpm", "-b", "swtpm", "-b-label", "swtpm-again",
		"-n", "30", "-n-create", "3", "-warmup", "2", "-starts", "3", "-idle", "3", "-out", out}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := run(ctx, args, &table); err != nil {
		t.Fatalf("run: %v", err)
	}
	got := table.String()
	for _, want := range []string{"GetRandom(32) p50", "NV_Write (64 B) p99", "CreatePrimary ECC P-256 + Flush p50",
		"start-to-ready, median of 3", "PSS per idle instance, mean of 3", "swtpm-again", "swtpm 0.7"} {
		if !strings.Contains(got, want) {
			t.Errorf("table lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "n/a") || strings.Contains(got, "| 0.00 ") || strings.Contains(got, "| 0 KiB") {
		t.Errorf("table has a missing or zero measure:\n%s", got)
	}
	file, err := os.ReadFile(out)
	if err != nil || string(file) != got {
		t.Errorf("-out file = %q, %v; want the printed table", file, err)
	}
}

func TestKeyFileIsPrivate(t *testing.T) {
	dir := t.TempDir()
	p, err := writeKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	b, _ := os.ReadFile(p)
	if len(b) != 64 || strings.Trim(string(b), "0123456789abcdef") != "" {
		t.Errorf("key file holds %d bytes %q..., want 64 hex digits", len(b), b[:min(len(b), 4)])
	}
	if _, err := writeKey(dir); err == nil {
		t.Errorf("writeKey over an existing key file succeeded, want O_EXCL to refuse")
	}
}

// TestKeyNotInArgv starts swtpm as the benchmark does, with each way of
// passing the key, and checks the key's text is in neither argv nor environ.
func TestKeyNotInArgv(t *testing.T) {
	e2e.Require(t, "swtpm")
	for _, kp := range []keyPassing{keyByFD, keyByFile} {
		t.Run(string(kp), func(t *testing.T) {
			dir := t.TempDir()
			keyFile, err := writeKey(dir)
			if err != nil {
				t.Fatal(err)
			}
			key, _ := os.ReadFile(keyFile)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			s, err := startReady(ctx, backend{Name: "swtpm", Path: "swtpm"}, filepath.Join(dir, "tpm"), keyFile, kp)
			if err != nil {
				t.Fatal(err)
			}
			defer s.stop()
			pid := s.in.pid()
			for _, f := range []string{"cmdline", "environ"} {
				b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), f))
				if err != nil {
					t.Fatal(err)
				}
				if strings.Contains(string(b), string(key)) {
					t.Errorf("the key is in /proc/%d/%s", pid, f)
				}
			}
		})
	}
}

// TestBenchNkpSwtpm runs the benchmark, small, against nkp-swtpm built from
// this module: it accepts swtpm's command line with the key on an fd, keeps
// encrypted state and answers every measured command.
func TestBenchNkpSwtpm(t *testing.T) {
	e2e.Require(t, "swtpm", "go")
	nkp := e2e.BuildBinary(t, "./cmd/nkp-swtpm")
	var table strings.Builder
	args := []string{"-a", "swtpm", "-b", nkp,
		"-n", "30", "-n-create", "3", "-warmup", "2", "-starts", "3", "-idle", "3"}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := run(ctx, args, &table); err != nil {
		t.Fatalf("run against %s: %v", nkp, err)
	}
	got := table.String()
	if !strings.Contains(got, "nkp-swtpm") || strings.Contains(got, "n/a") || strings.Contains(got, "| 0 KiB") {
		t.Errorf("table against nkp-swtpm lacks a measure:\n%s", got)
	}
}

func TestMain(m *testing.M) { e2e.Main(m) }
