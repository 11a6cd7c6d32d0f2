package main

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"sort"
	"strings"
	"time"
)

// row is one line of the table: a value for each backend and an optional
// target for the ratio b ÷ a.
type row struct {
	name   string
	a, b   float64
	unit   string  // "µs", "ms", "KiB"
	target float64 // 0: none
}

func (r report) rows() []row {
	var rows []row
	// Issue 9's targets: p50 ≤ 1.0, p99 ≤ 1.1 and CPU ≤ 1.0 for the small commands
	// (GetRandom, PCR_Extend); none for NV_Write and CreatePrimary; start-to-ready ≤ 0.7;
	// PSS ≤ 1.2 with shared libraries (≤ 1.0 for a static build, read off by hand).
	small := func(op string) bool { return op == opGetRandom || op == opPCRExtend }
	for _, op := range ops {
		unit, scale := "µs", float64(time.Microsecond)
		if op == opCreate {
			unit, scale = "ms", float64(time.Millisecond)
		}
		for _, q := range []struct {
			name   string
			q      float64
			target float64
		}{{"p50", 0.5, 1.0}, {"p99", 0.99, 1.1}} {
			target := 0.0
			if small(op) {
				target = q.target
			}
			rows = append(rows, row{
				name:   op + " " + q.name,
				a:      float64(percentile(r.a.lat[op], q.q)) / scale,
				b:      float64(percentile(r.b.lat[op], q.q)) / scale,
				unit:   unit,
				target: target,
			})
		}
	}
	for _, op := range ops {
		unit, scale := "µs", float64(time.Microsecond)
		if op == opCreate {
			unit, scale = "ms", float64(time.Millisecond)
		}
		target := 0.0
		if small(op) {
			target = 1.0
		}
		rows = append(rows, row{
			name:   op + ": backend CPU time per call",
			a:      float64(r.a.cpu[op]) / scale,
			b:      float64(r.b.cpu[op]) / scale,
			unit:   unit,
			target: target,
		})
	}
	rows = append(rows, row{
		name:   fmt.Sprintf("start-to-ready, median of %d", r.cfg.Starts),
		a:      float64(percentile(r.a.startReady, 0.5)) / float64(time.Millisecond),
		b:      float64(percentile(r.b.startReady, 0.5)) / float64(time.Millisecond),
		unit:   "ms",
		target: 0.7,
	}, row{
		name: fmt.Sprintf("start-to-ready: backend CPU time, median of %d", r.cfg.Starts),
		a:    float64(percentile(r.a.startCPU, 0.5)) / float64(time.Millisecond),
		b:    float64(percentile(r.b.startCPU, 0.5)) / float64(time.Millisecond),
		unit: "ms",
	})
	if r.cfg.AfterIdle > 0 {
		rows = append(rows, row{
			name: fmt.Sprintf("GetRandom(32) after %v idle (nkp-swtpm: after its idle trim), median of %d", idleGap, r.cfg.AfterIdle),
			a:    float64(percentile(r.a.afterIdle, 0.5)) / float64(time.Microsecond),
			b:    float64(percentile(r.b.afterIdle, 0.5)) / float64(time.Microsecond),
			unit: "µs",
		}, row{
			name: fmt.Sprintf("GetRandom(32) right after that one, median of %d", r.cfg.AfterIdle),
			a:    float64(percentile(r.a.warm, 0.5)) / float64(time.Microsecond),
			b:    float64(percentile(r.b.warm, 0.5)) / float64(time.Microsecond),
			unit: "µs",
		})
	}
	rows = append(rows,
		row{name: fmt.Sprintf("RSS per idle instance, mean of %d", r.cfg.Idle), a: meanKiB(r.a.mem, false), b: meanKiB(r.b.mem, false), unit: "KiB"},
		row{name: fmt.Sprintf("PSS per idle instance, mean of %d", r.cfg.Idle), a: meanKiB(r.a.mem, true), b: meanKiB(r.b.mem, true), unit: "KiB", target: 1.2},
	)
	return rows
}

func meanKiB(ms []memory, pss bool) float64 {
	if len(ms) == 0 {
		return 0
	}
	var sum int64
	for _, m := range ms {
		if pss {
			sum += m.PSS
		} else {
			sum += m.RSS
		}
	}
	return float64(sum) / float64(len(ms))
}

// verdict says whether a ratio meets its target.
func (r row) verdict() string {
	if r.target == 0 {
		return "—"
	}
	if r.a <= 0 || r.b <= 0 {
		return "n/a"
	}
	mark := "✗"
	if math.Round(r.b/r.a*100)/100 <= r.target { // as the ratio column shows it
		mark = "✓"
	}
	return fmt.Sprintf("≤ %.1f %s", r.target, mark)
}

func (r row) ratio() string {
	if r.a <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", r.b/r.a)
}

func formatValue(v float64, unit string) string {
	switch {
	case unit == "KiB":
		return fmt.Sprintf("%.0f KiB", v)
	case v >= 100:
		return fmt.Sprintf("%.0f %s", v, unit)
	case v >= 10:
		return fmt.Sprintf("%.1f %s", v, unit)
	}
	return fmt.Sprintf("%.2f %s", v, unit)
}

// markdown renders the run as a markdown section.
func (r report) markdown() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "| measure | %s | %s | ratio (%s ÷ %s) | target |\n", r.cfg.A.Name, r.cfg.B.Name, short(r.cfg.B.Name), short(r.cfg.A.Name))
	sb.WriteString("|---|---:|---:|---:|---|\n")
	for _, row := range r.rows() {
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s |\n", row.name, formatValue(row.a, row.unit), formatValue(row.b, row.unit), row.ratio(), row.verdict())
	}
	fmt.Fprintf(&sb, "\nRun %s, %.0f s; %s; load average %s before, %s after. "+
		"%d timed calls per command (%d CreatePrimary) after %d warm-up calls, one data connection per backend, the two backends taking turns every %d calls; "+
		"encrypted state, key by %s; unix sockets; %s.\n",
		r.start.UTC().Format("2006-01-02 15:04 MST"), r.end.Sub(r.start).Seconds(), machine(), r.load[0], r.load[1],
		r.cfg.N, r.cfg.NCreate, r.cfg.Warmup, r.cfg.Block, keyDescription(r.cfg.Key), pinning(r.cfg.CPUs))
	return sb.String()
}

// markdownRuns renders several runs of the same configuration: the median of each
// value, the median of the runs' ratios (what the target is checked against), and
// every run's ratio, so that the noise shows.
func markdownRuns(reps []report) string {
	first, last := reps[0], reps[len(reps)-1]
	var sb strings.Builder
	fmt.Fprintf(&sb, "| measure | %s | %s | ratio (%s ÷ %s), median | ratio in each run | target |\n",
		first.cfg.A.Name, first.cfg.B.Name, short(first.cfg.B.Name), short(first.cfg.A.Name))
	sb.WriteString("|---|---:|---:|---:|---|---|\n")
	for _, m := range combineRuns(reps) {
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s | %s |\n", m.name, formatValue(m.a, m.unit), formatValue(m.b, m.unit),
			m.ratio, strings.Join(m.each, ", "), m.verdict)
	}
	fmt.Fprintf(&sb, "\n%d runs from %s to %s; %s; load average %s before the first, %s after the last. Values are medians over the runs. "+
		"Each run: %d timed calls per command (%d CreatePrimary) after %d warm-up calls, one data connection per backend, the two backends taking turns every %d calls; "+
		"%d starts and %d idle instances per backend (memory read %v after the last was ready); encrypted state, key by %s; unix sockets; %s.\n",
		len(reps), first.start.UTC().Format("2006-01-02 15:04"), last.end.UTC().Format("15:04 MST"), machine(), first.load[0], last.load[1],
		first.cfg.N, first.cfg.NCreate, first.cfg.Warmup, first.cfg.Block, first.cfg.Starts, first.cfg.Idle, first.cfg.Settle, keyDescription(first.cfg.Key), pinning(first.cfg.CPUs))
	return sb.String()
}

// combined is one row over several runs.
type combined struct {
	name, unit string
	a, b       float64  // medians of the values
	ratio      string   // median of the runs' ratios
	each       []string // every run's ratio
	verdict    string
}

func combineRuns(reps []report) []combined {
	per := make([][]row, len(reps))
	for i, r := range reps {
		per[i] = r.rows()
	}
	var out []combined
	for j, r0 := range per[0] {
		var as, bs, ratios []float64
		c := combined{name: r0.name, unit: r0.unit}
		for i := range per {
			r := per[i][j]
			as, bs = append(as, r.a), append(bs, r.b)
			c.each = append(c.each, r.ratio())
			if r.a > 0 {
				ratios = append(ratios, r.b/r.a)
			}
		}
		c.a, c.b = median(as), median(bs)
		c.ratio, c.verdict = "n/a", "—"
		if len(ratios) > 0 {
			m := median(ratios)
			c.ratio = fmt.Sprintf("%.2f", m)
			if r0.target > 0 {
				c.verdict = row{a: 1, b: m, target: r0.target}.verdict()
			}
		}
		out = append(out, c)
	}
	return out
}

// median of v (the mean of the middle two for an even count); 0 for none.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func short(label string) string {
	if i := strings.IndexByte(label, ' '); i > 0 {
		return label[:i]
	}
	return label
}

func keyDescription(k keyPassing) string {
	if k == keyByFile {
		return "--key file= (0600 file, 64 hex digits), mode=aes-256-cbc"
	}
	return "--key fd=3 (inherited 0600 file, 64 hex digits), mode=aes-256-cbc"
}

// machine describes the CPU, core count and kernel.
func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				if i := strings.IndexByte(l, ':'); i > 0 {
					cpu = strings.Join(strings.Fields(l[i+1:]), " ")
				}
				break
			}
		}
	}
	kernel := "?"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%s, %d cores, Linux %s", cpu, runtime.NumCPU(), kernel)
}

func pinning(cpus string) string {
	if cpus == "" {
		return "no CPU pinning"
	}
	return "client and backends pinned to CPU " + cpus
}
