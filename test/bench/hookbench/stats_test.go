package main

import (
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

func msd(v ...float64) []time.Duration {
	out := make([]time.Duration, len(v))
	for i, x := range v {
		out[i] = time.Duration(x * 1e6)
	}
	return out
}

// rounds makes r rounds of n samples each: sample j of round i is f(i, j) ms.
func rounds(r, n int, f func(i, j int) float64) [][]time.Duration {
	out := make([][]time.Duration, r)
	for i := range out {
		for j := range n {
			out[i] = append(out[i], time.Duration(f(i, j)*1e6))
		}
	}
	return out
}

func TestPct(t *testing.T) {
	hundred := rounds(1, 100, func(_, j int) float64 { return float64(100 - j) })[0] // 100..1, unsorted
	tests := []struct {
		name string
		d    []time.Duration
		p    float64
		want time.Duration
	}{
		{"empty", nil, .99, 0},
		{"one", msd(7), .99, 7 * time.Millisecond},
		{"p50 of 1..100", hundred, .5, 50 * time.Millisecond},
		{"p99 of 1..100", hundred, .99, 99 * time.Millisecond},
		{"p99 of 50 is the largest", rounds(1, 50, func(_, j int) float64 { return float64(j) })[0], .99, 49 * time.Millisecond},
		{"p0 is the smallest", msd(3, 1, 2), 0, 1 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := pct(tt.d, tt.p); got != tt.want {
			t.Errorf("%s: pct(%v) = %v, want %v", tt.name, tt.p, got, tt.want)
		}
	}
}

func TestDeltaQuantile(t *testing.T) {
	base := rounds(10, 50, func(i, j int) float64 { return float64((i*7+j*13)%50) + 1 })
	shifted := rounds(10, 50, func(i, j int) float64 { return float64((i*7+j*13)%50) + 31 })
	// A slow round moves all of a round's samples: kind a saw it in round 3, b did not.
	slowRound := rounds(10, 50, func(i, j int) float64 {
		if i == 3 {
			return float64(j) + 100
		}
		return float64(j)
	})
	plainRounds := rounds(10, 50, func(i, j int) float64 { return float64(j) })
	tests := []struct {
		name           string
		a, b           [][]time.Duration
		point, lo, hi  time.Duration // lo, hi checked only when wantLoHi
		wantLoHi       bool
		resolved       bool
		containsZero   bool
		excludesTarget bool
	}{
		{name: "same samples: exactly zero", a: base, b: base, point: 0, lo: 0, hi: 0, wantLoHi: true, resolved: true, containsZero: true},
		{name: "every sample 30 ms later: exactly 30", a: shifted, b: base, point: 30 * time.Millisecond, lo: 30 * time.Millisecond, hi: 30 * time.Millisecond, wantLoHi: true, resolved: true},
		{name: "one round: the point, no interval", a: base[:1], b: base[:1], point: 0, lo: 0, hi: 0, wantLoHi: true},
		{name: "rounds differ in count: no interval", a: base, b: base[:5], point: pct(pool(base), .99) - pct(pool(base[:5]), .99)},
		{name: "one slow round: the interval reaches 0", a: slowRound, b: plainRounds, point: 95 * time.Millisecond /* 144 − 49 */, resolved: true, containsZero: true},
	}
	for _, tt := range tests {
		d := deltaQuantile(tt.a, tt.b, .99, 500, 1)
		if d.point != tt.point {
			t.Errorf("%s: point %v, want %v", tt.name, d.point, tt.point)
		}
		if tt.wantLoHi && (d.lo != tt.lo || d.hi != tt.hi) {
			t.Errorf("%s: interval [%v, %v], want [%v, %v]", tt.name, d.lo, d.hi, tt.lo, tt.hi)
		}
		if d.resolved != tt.resolved {
			t.Errorf("%s: resolved %v, want %v", tt.name, d.resolved, tt.resolved)
		}
		if d.lo > d.point || d.hi < d.point && tt.resolved {
			t.Errorf("%s: interval [%v, %v] does not hold the point %v", tt.name, d.lo, d.hi, d.point)
		}
		if tt.containsZero && (d.lo > 0 || d.hi < 0) {
			t.Errorf("%s: interval [%v, %v] excludes 0", tt.name, d.lo, d.hi)
		}
		if again := deltaQuantile(tt.a, tt.b, .99, 500, 1); again != d {
			t.Errorf("%s: the same seed gave %+v, then %+v", tt.name, d, again)
		}
	}
}

func TestVerdict(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		d    delta
		want string
	}{
		{delta{point: 5 * ms, lo: -3 * ms, hi: 12 * ms, resolved: true}, "met"},
		{delta{point: 20 * ms, lo: 20 * ms, hi: 20 * ms, resolved: true}, "met"},
		{delta{point: 30 * ms, lo: 21 * ms, hi: 40 * ms, resolved: true}, "not met"},
		{delta{point: 15 * ms, lo: 2 * ms, hi: 35 * ms, resolved: true}, "unresolved (the interval straddles"},
		{delta{point: 1 * ms, lo: 1 * ms, hi: 1 * ms}, "unresolved (one round"},
	}
	for _, tt := range tests {
		if got := tt.d.verdict(20 * ms); !strings.HasPrefix(got, tt.want) {
			t.Errorf("%v.verdict(20ms) = %q, want %q…", tt.d, got, tt.want)
		}
	}
	if got, want := (delta{point: 2500 * time.Microsecond, lo: -1e6, hi: 9e6, resolved: true}).String(), "2.5 [-1.0, 9.0]"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
}

func TestParseHookLog(t *testing.T) {
	const ok = `d1 prepare 1000000 3000000 0
d2 prepare 1000000 2000000 0
d1 start 5000000 9000000 0
d2 start 5000000 6000000 0
d1 started 10000000 11000000 0
d2 release 1 2 1
`
	tests := []struct {
		name       string
		log        string
		n          int
		hook, both []time.Duration
		err        string
	}{
		{name: "two domains, other operations ignored", log: ok, n: 2, hook: msd(2, 1), both: msd(6, 2)},
		{name: "a start missing", log: "d1 prepare 1 2 0\nd1 start 3 4 0\nd2 prepare 1 2 0\n", n: 2, err: "2 prepare and 1 start hooks"},
		{name: "more domains than starts", log: ok, n: 1, err: "for 1 starts"},
		{name: "a failed hook", log: "d1 prepare 1 2 1\nd1 start 3 4 0\n", n: 1, err: "bad hook log line"},
		{name: "end before start", log: "d1 prepare 5 2 0\nd1 start 3 4 0\n", n: 1, err: "bad hook log line"},
		{name: "not a number", log: "d1 prepare x 2 0\nd1 start 3 4 0\n", n: 1, err: "bad hook log line"},
		{name: "empty", log: "", n: 1, err: "0 prepare and 0 start"},
	}
	for _, tt := range tests {
		hook, both, err := parseHookLog([]byte(tt.log), tt.n)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s: error %v, want one with %q", tt.name, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if !slices.Equal(hook, tt.hook) || !slices.Equal(both, tt.both) {
			t.Errorf("%s: hook %v both %v, want %v %v", tt.name, hook, both, tt.hook, tt.both)
		}
	}
}

// TestReport renders a run of four kinds: a row per kind and concurrency in both tables,
// intervals on the +p99 cells, and the verdict at the highest concurrency.
func TestReport(t *testing.T) {
	kinds := []*kind{{label: "ref"}, {label: "cal"}, {label: "plain"}, {label: "prot", protected: true}}
	conc := []int{1, 50}
	res := map[string]map[int]*sample{}
	for ki, k := range kinds {
		res[k.label] = map[int]*sample{}
		for _, n := range conc {
			s := &sample{}
			for r := range 4 {
				rs := roundSample{machineCPU: time.Duration(n) * 100 * time.Millisecond}
				for j := range n {
					d := time.Duration(1+j+r+ki*20) * time.Millisecond // 20 ms more per kind
					rs.hook, rs.both, rs.start = append(rs.hook, d), append(rs.both, 2*d), append(rs.start, 10*d)
				}
				if k.protected {
					rs.hostdCPU, rs.vtpmCPU, rs.vtpms = time.Duration(n)*time.Millisecond, time.Duration(n)*20*time.Millisecond, n
				}
				s.rounds = append(s.rounds, rs)
			}
			if k.protected {
				s.hostd = hist{0.0005: float64(4 * n), 0.005: float64(4 * n), math.Inf(1): float64(4 * n)}
			}
			res[k.label][n] = s
		}
	}
	out := report(kinds, conc, res, 4, "paused") + cpuReport(kinds, conc, res)
	for _, want := range []string{
		"| prot | 50 | 200 |",
		"| 60.0 [60.0, 60.0] | 20.0 [20.0, 20.0] |", // prot's +p99: 20 ms per kind, exactly
		"Calibration (reference again − reference): 20.0 [20.0, 20.0] ms",
		"- prot: +p99 ref 60.0 [60.0, 60.0] ms: not met; +p99 plain 20.0 [20.0, 20.0] ms: met",
		"| prot | 50 | 100.0 | 1.0 | 20.0 | 200 | 0.5 | 0.5 |",
		"| ref | 1 | 100.0 |  |  |  |  |  |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}
