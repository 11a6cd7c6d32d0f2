package main

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"time"
)

// pct is the p-quantile of d (nearest rank): pct(d, .99) of 500 samples is the 495th
// smallest; 0 if d is empty.
func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

// pool concatenates rounds' samples.
func pool(rounds [][]time.Duration) []time.Duration {
	var out []time.Duration
	for _, r := range rounds {
		out = append(out, r...)
	}
	return out
}

// delta is the q-quantile of a's pooled samples minus b's, with a bootstrap interval.
type delta struct {
	point, lo, hi time.Duration
	resolved      bool // lo < hi came from at least two rounds; else lo = hi = point
}

// bootstrapLevel is the coverage of delta's interval.
const bootstrapLevel = 0.95

// deltaQuantile compares two kinds measured in the same interleaved rounds: the point
// is pct(pool(a), q) − pct(pool(b), q), and [lo, hi] is the central 95% of that difference
// over resamples resamplings of the rounds, with replacement and paired (a resample
// takes round i of both kinds together). Rounds, not samples, are resampled because
// the samples of one round share its conditions (what else the machine did then): a
// round where everything waited moves all its 50 samples at once. a and b must have
// the same number of rounds; with fewer than two there is no interval (lo = hi = point).
// The seed makes the interval reproducible for the same samples.
func deltaQuantile(a, b [][]time.Duration, q float64, resamples int, seed uint64) delta {
	d := delta{point: pct(pool(a), q) - pct(pool(b), q)}
	d.lo, d.hi = d.point, d.point
	if len(a) != len(b) || len(a) < 2 || resamples < 1 {
		return d
	}
	rng := rand.New(rand.NewPCG(seed, 0x686f6f6b))
	diffs := make([]time.Duration, resamples)
	var ra, rb []time.Duration
	for i := range diffs {
		ra, rb = ra[:0], rb[:0]
		for range a {
			j := rng.IntN(len(a))
			ra = append(ra, a[j]...)
			rb = append(rb, b[j]...)
		}
		diffs[i] = pct(ra, q) - pct(rb, q)
	}
	tail := (1 - bootstrapLevel) / 2
	d.lo, d.hi, d.resolved = pct(diffs, tail), pct(diffs, 1-tail), true
	return d
}

// String is "point [lo, hi]" in ms, or the point alone without an interval.
func (d delta) String() string {
	if !d.resolved {
		return ms(d.point)
	}
	return fmt.Sprintf("%s [%s, %s]", ms(d.point), ms(d.lo), ms(d.hi))
}

// verdict says whether the added time d meets a target (at most target): met when the
// whole interval is at or under it, not met when the whole interval is over it,
// unresolved when the interval straddles it (the noise is larger than the difference).
func (d delta) verdict(target time.Duration) string {
	switch {
	case !d.resolved:
		return "unresolved (one round: no interval; give -rounds 2 or more)"
	case d.hi <= target:
		return "met"
	case d.lo > target:
		return "not met"
	default:
		return "unresolved (the interval straddles the target)"
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/1e6) }
