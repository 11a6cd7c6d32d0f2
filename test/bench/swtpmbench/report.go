package main

import (
	"fmt"
	"math"
	"os"
	"runtime"
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
	for _, op := range ops {
		target := 1.0
		if op == opNVWrite {
			target = 0.7
		}
		unit, scale := "µs", float64(time.Microsecond)
		if op == opCreate {
			unit, scale = "ms", float64(time.Millisecond)
		}
		for _, q := range []struct {
			name string
			q    float64
		}{{"p50", 0.5}, {"p99", 0.99}} {
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
		rows = append(rows, row{
			name: op + ": backend CPU time per call",
			a:    float64(r.a.cpu[op]) / scale,
			b:    float64(r.b.cpu[op]) / scale,
			unit: unit,
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
	rows = append(rows,
		row{name: fmt.Sprintf("RSS per idle instance, mean of %d", r.cfg.Idle), a: meanKiB(r.a.mem, false), b: meanKiB(r.b.mem, false), unit: "KiB"},
		row{name: fmt.Sprintf("PSS per idle instance, mean of %d", r.cfg.Idle), a: meanKiB(r.a.mem, true), b: meanKiB(r.b.mem, true), unit: "KiB", target: 1.0},
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
	fmt.Fprintf(&sb, "| measure | %s | %s | ratio (%s ÷ %s) | target |\n", r.cfg.A.Label, r.cfg.B.Label, short(r.cfg.B.Label), short(r.cfg.A.Label))
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
