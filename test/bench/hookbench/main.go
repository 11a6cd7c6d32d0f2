// Command hookbench measures what nkp's libvirt hook adds to `virsh start`: the time spent
// inside the prepare hook (from the moment libvirtd's hook process starts nkp-hook to its
// exit), and inside the prepare and start hooks together (nkp-hostd launches the vTPM at
// prepare and waits for it at start), with 1, 10 and 50 concurrent starts, and the start times themselves, in a private
// libvirtd (test/libvirtns) so no other domain on the machine runs the hook.
//
// Kinds of domain, measured in interleaved rounds (the order rotates every round):
//
//   - reference: the hook is `cat >/dev/null` (a process that reads the XML and exits);
//   - reference (again): the same, the calibration row (reference against itself);
//   - plain: nkp-hook with a domain without nkp metadata (its fast path);
//   - protected: nkp-hook with a domain protected by nkp, answered by a real nkp-hostd
//     that starts the VM's nkp-swtpm (-protected, default on: a provider is initialised,
//     backed up and served on the Host's uplink, nkp-hostd joins it with nkp-swtpm as the
//     host TPM; the programs come from the directory of -hook);
//   - protected with disks (-disks N): the same with N encrypted disks per domain, made
//     by `nkpctl vm protect` from plain 8 MiB qcow2 images (LUKS in qcow2, keys in
//     libvirt secrets that nkp-hostd defines; its prepare check answers from memory).
//
// Then (-vtpms N, default 100) N vTPMs are prepared through the hook path (nkp-hook
// prepare with a protected domain's XML, no QEMU) and nkp-hostd's RSS and PSS are
// reported before and after, with the vTPM processes' own PSS.
//
// The hook installed is a shell wrapper that takes a nanosecond timestamp, runs the
// hook, takes another, and appends them to a log; the wrapper's own fork of `date` is
// outside the interval. Domains are tiny (32 MiB, no disk, SeaBIOS finds nothing to boot)
// and are destroyed after each round. QEMU runs without cgroups, as in every test Host
// (test/libvirtns), so 50 TCG guests compete thread for thread with libvirtd, the hook
// and nkp-hostd: the worst case. -cgroups keeps libvirt's default placement instead (each
// QEMU in a group under machine/, all of them sharing one group's CPU weight), as on a
// host where libvirt manages cgroups. Output: a markdown table with p50/p99 per kind and
// concurrency of the prepare hook, of prepare+start, and of `virsh start`. The hook p99s
// are also given against two baselines of the same run: "+p99 ref", against the
// reference (what a host without nkp takes), and "+p99 plain", against the plain kind
// (what an unprotected domain takes on a host with nkp installed, the "unprotected
// domains" issue 7's target compares with); `virsh start`'s p99 as a ratio to the
// reference's. A second table gives nkp-hostd's own share of the protected kinds' prepare
// hook, from its metric nkp_hostd_hook_duration_seconds read before and after each round
// (request read to reply written: the rest of prot − plain is nkp-hook's own start with
// the Go runtime, the socket's wake-ups, and the vTPMs starting alongside).
//
// The p99 of one round of 50 is its largest sample (of 3 rounds, the second largest), so
// it moves by tens of ms from run to run (the calibration row shows by how much). For a
// steadier p99 at one concurrency, give it more rounds: -n 50 -rounds 5 is 250 samples
// per kind.
//
//	make build && go run ./test/bench/hookbench -hook bin/nkp-hook -n 1,10,50 -rounds 5 -disks 4 -out bench-hook.md
//	make build && go run ./test/bench/hookbench -hook bin/nkp-hook -n 50 -rounds 5 -vtpms 0
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/test/libvirtns"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "hookbench:", err)
		os.Exit(1)
	}
}

// wrapper is the hook libvirtd runs: the mode file says what to time.
const wrapper = `#!/bin/sh
read mode </etc/nkp/hookbench.mode
s=$(date +%s%N)
case $mode in
reference) cat >/dev/null; rc=0 ;;
*) /etc/libvirt/hooks/nkp-hook "$@"; rc=$? ;;
esac
e=$(date +%s%N)
echo "$1 $2 $s $e $rc" >>/var/lib/nkp/hookbench.log
exit $rc
`

// kind is one kind of domain measured.
type kind struct {
	label     string // row label
	mode      string // what the wrapper runs: reference or nkp
	protected bool   // domains carry nkp's metadata and an external vTPM
	disks     int    // encrypted disks per domain (protected by nkpctl vm protect)
	names     []string
}

type sample struct {
	hook  []time.Duration // inside the prepare hook
	both  []time.Duration // inside the prepare and the start hook of one domain, summed
	start []time.Duration // virsh start, wall clock
	hostd hist            // nkp-hostd's own time answering the prepare hooks (its metric)
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("hookbench", flag.ContinueOnError)
	hook := fs.String("hook", filepath.Join(os.Getenv("NKP_BIN"), "nkp-hook"), "the nkp-hook program")
	ns := fs.String("n", "1,10,50", "concurrent starts per round, comma-separated")
	rounds := fs.Int("rounds", 5, "rounds per kind and concurrency (interleaved)")
	out := fs.String("out", "", "write the markdown table here too")
	protected := fs.Bool("protected", true, "also measure domains protected by nkp (starts a provider and nkp-hostd; programs from the -hook's directory)")
	vtpms := fs.Int("vtpms", 100, "then prepare this many vTPMs through the hook path and report nkp-hostd's memory (0: skip; needs -protected)")
	cgroups := fs.Bool("cgroups", false, "libvirt's default cgroup placement: each QEMU in a group under machine/, all of them sharing one group's CPU weight against libvirtd, the hook and nkp-hostd (default: QEMU without cgroups, competing thread for thread with them, the worst case)")
	disks := fs.Int("disks", 0, "also measure protected domains with this many encrypted disks each (made with `nkpctl vm protect`; needs -protected)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var conc []int
	for _, s := range strings.Split(*ns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > 200 {
			return fmt.Errorf("-n: %q is not a count of 1..200", s)
		}
		conc = append(conc, n)
	}
	hookPath, err := filepath.Abs(*hook) // the programs next to it also run inside the Host, whose cwd differs
	if err != nil {
		return fmt.Errorf("-hook: %w", err)
	}
	hookBin, err := os.ReadFile(hookPath)
	if err != nil {
		return fmt.Errorf("-hook: %w (run `make build` or give -hook PATH)", err)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root (a private libvirtd in its own namespaces)")
	}
	h, err := libvirtns.Start(ctx, libvirtns.Config{
		Name: "bench", Private: []string{"/run/nkp", "/var/lib/nkp", "/etc/nkp"},
		Tmpfs:   []string{"/run/nkp"}, // as on a real host: hostd's vTPM records are fsynced there
		Hooks:   map[string][]byte{"zz-hookbench": []byte(wrapper)},
		Cgroups: *cgroups,
	})
	if err != nil {
		return err
	}
	defer h.Close()
	// nkp-hook next to qemu.d, not in it: only the wrapper is a hook.
	if err := os.WriteFile(h.Path("/etc/libvirt/hooks/nkp-hook"), hookBin, 0o755); err != nil {
		return err
	}
	max := slices.Max(conc)
	kinds := []*kind{
		{label: "reference (`cat >/dev/null` as the hook)", mode: "reference"},
		{label: "reference again (calibration)", mode: "reference"},
		{label: "nkp-hook, plain domain (fast path)", mode: "nkp"},
	}
	var n *nkpHost
	if *protected {
		if n, err = startNKP(ctx, h, filepath.Dir(hookPath)); err != nil {
			return err
		}
		defer n.close()
		kinds = append(kinds, &kind{label: "nkp-hook + nkp-hostd, protected domain (vTPM started)", mode: "nkp", protected: true})
		if *disks > 0 {
			kinds = append(kinds, &kind{label: fmt.Sprintf("nkp-hook + nkp-hostd, protected domain with %d encrypted disks", *disks), mode: "nkp", disks: *disks})
		}
	} else if *disks > 0 {
		return errors.New("-disks needs -protected")
	}
	for i, k := range kinds {
		for j := range max {
			name := fmt.Sprintf("hookbench-%d-%03d", i, j)
			id := uuid.NewString()
			xml := []byte(tinyXML(name, id))
			if k.protected {
				if xml, err = n.protectedXML(name, id); err != nil {
					return err
				}
			}
			if k.disks > 0 {
				if xml, err = n.diskXML(ctx, name, id, k.disks); err != nil {
					return err
				}
			}
			if err := defineTiny(ctx, h, name, xml); err != nil {
				return err
			}
			if k.disks > 0 {
				if err := n.protect(ctx, name); err != nil {
					return err
				}
			}
			k.names = append(k.names, name)
		}
		if k.disks > 0 {
			if err := n.waitSecrets(ctx, len(k.names)*k.disks); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "hookbench: %d domains with %d encrypted disks each protected\n", len(k.names), k.disks)
		}
	}
	results := map[string]map[int]*sample{}
	for _, k := range kinds {
		results[k.label] = map[int]*sample{}
		for _, n := range conc {
			results[k.label][n] = &sample{}
		}
	}
	logPath := h.Path("/var/lib/nkp/hookbench.log")
	for r := range *rounds {
		for _, c := range conc {
			for i := range kinds {
				k := kinds[(i+r)%len(kinds)]
				var before hist
				if n != nil && k.mode == "nkp" {
					if before, err = n.hookHist("prepare"); err != nil {
						return err
					}
				}
				s, err := round(ctx, h, k, c, logPath)
				if err != nil {
					return fmt.Errorf("%s, %d at once: %w", k.label, c, err)
				}
				acc := results[k.label][c]
				if before != nil {
					after, err := n.hookHist("prepare")
					if err != nil {
						return err
					}
					if acc.hostd == nil {
						acc.hostd = hist{}
					}
					acc.hostd.add(after.sub(before))
				}
				acc.hook = append(acc.hook, s.hook...)
				acc.both = append(acc.both, s.both...)
				acc.start = append(acc.start, s.start...)
			}
		}
		fmt.Fprintf(os.Stderr, "hookbench: round %d of %d done\n", r+1, *rounds)
	}
	table := report(kinds, conc, results, *rounds) + hostdReport(kinds, conc, results)
	if n != nil && *vtpms > 0 {
		mem, err := vtpmMemory(ctx, n, *vtpms)
		if err != nil {
			return err
		}
		table += mem
	}
	fmt.Fprint(stdout, table)
	if *out != "" {
		return os.WriteFile(*out, []byte(table), 0o644)
	}
	return nil
}

// tinyXML is a 32 MiB domain without disks (SeaBIOS finds nothing to boot and waits).
func tinyXML(name, uuid string) string {
	return fmt.Sprintf(`<domain type='qemu'><name>%s</name><uuid>%s</uuid><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><on_poweroff>destroy</on_poweroff>
<devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>`, name, uuid)
}

func defineTiny(ctx context.Context, h *libvirtns.Host, name string, xml []byte) error {
	p := filepath.Join(h.Dir, name+".xml")
	if err := os.WriteFile(p, xml, 0o644); err != nil {
		return err
	}
	_, err := h.Virsh(ctx, "define", p)
	return err
}

// round starts n domains of kind k at once, reads the prepare hook's times from the log,
// and destroys them.
func round(ctx context.Context, h *libvirtns.Host, k *kind, n int, logPath string) (sample, error) {
	if err := os.WriteFile(h.Path("/etc/nkp/hookbench.mode"), []byte(k.mode+"\n"), 0o644); err != nil {
		return sample{}, err
	}
	os.Remove(logPath)
	var s sample
	var mu sync.Mutex
	var wg sync.WaitGroup
	var pending atomic.Int32
	errs := make([]error, n)
	t0 := time.Now()
	for i := range n {
		wg.Add(1)
		pending.Add(1)
		go func() {
			defer wg.Done()
			defer pending.Add(-1)
			t0 := time.Now()
			_, errs[i] = h.Virsh(ctx, "start", k.names[i])
			mu.Lock()
			s.start = append(s.start, time.Since(t0))
			mu.Unlock()
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	// A slow round says where it is: starts pending and the hooks libvirtd has run so far.
	for tick := time.NewTicker(30 * time.Second); ; {
		select {
		case <-done:
			tick.Stop()
		case <-tick.C:
			fmt.Fprintf(os.Stderr, "hookbench: %s, %d at once: %d of %d starts pending after %v; hooks run so far: %s\n",
				k.label, n, pending.Load(), n, time.Since(t0).Round(time.Second), hookCounts(logPath))
			continue
		}
		break
	}
	started := time.Since(t0)
	// Destroy as many at once as were started (one after the other took ~2.5 s each on a
	// loaded machine: a round of 50 spent minutes here, between the measured starts).
	var dwg sync.WaitGroup
	for i := range n {
		dwg.Add(1)
		go func() { defer dwg.Done(); h.Virsh(ctx, "destroy", k.names[i]) }()
	}
	dwg.Wait()
	fmt.Fprintf(os.Stderr, "hookbench: %s, %d at once: started in %v, destroyed in %v\n", k.label, n,
		started.Round(time.Millisecond), (time.Since(t0) - started).Round(time.Millisecond))
	if err := errors.Join(errs...); err != nil {
		return sample{}, err
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		return sample{}, fmt.Errorf("the hook wrote no log: %w", err)
	}
	// nkp-hostd launches the vTPM at prepare and waits for it at start (the hook libvirt
	// runs just before QEMU): both are time the hook adds, so both are counted.
	sum := map[string]time.Duration{}
	starts := 0
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 5 || (f[1] != "prepare" && f[1] != "start") {
			continue
		}
		a, err1 := strconv.ParseInt(f[2], 10, 64)
		z, err2 := strconv.ParseInt(f[3], 10, 64)
		if err1 != nil || err2 != nil || f[4] != "0" {
			return sample{}, fmt.Errorf("bad hook log line %q", line)
		}
		if f[1] == "prepare" {
			s.hook = append(s.hook, time.Duration(z-a))
		} else {
			starts++
		}
		sum[f[0]] += time.Duration(z - a)
	}
	if len(s.hook) != n || starts != n {
		return sample{}, fmt.Errorf("%d prepare and %d start hooks logged for %d starts", len(s.hook), starts, n)
	}
	for _, d := range sum {
		s.both = append(s.both, d)
	}
	return s, nil
}

// hookCounts counts the hook log's lines by operation ("prepare 50 start 48 …").
func hookCounts(logPath string) string {
	b, _ := os.ReadFile(logPath)
	count := map[string]int{}
	var ops []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 5 {
			if count[f[1]] == 0 {
				ops = append(ops, f[1])
			}
			count[f[1]]++
		}
	}
	var out []string
	for _, op := range ops {
		out = append(out, fmt.Sprintf("%s %d", op, count[op]))
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/1e6) }

func report(kinds []*kind, conc []int, res map[string]map[int]*sample, rounds int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "hookbench: %d interleaved rounds; times in ms; prepare+start = the prepare and start hooks of one domain summed (nkp-hostd launches the vTPM at prepare and waits for it at start); "+
		"+p99 ref = kind p99 − reference p99 (a host without nkp), +p99 plain = kind p99 − plain p99 (an unprotected domain on a host with nkp), both from the same run\n\n", rounds)
	fmt.Fprintf(&b, "| kind | at once | samples | prepare p50 | prepare p99 | +p99 ref | +p99 plain | prepare+start p50 | prepare+start p99 | +p99 ref | +p99 plain | virsh start p50 | virsh start p99 | start ratio p99 |\n")
	fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	ref, plain := kinds[0].label, kinds[2].label
	for _, n := range conc {
		r, p := res[ref][n], res[plain][n]
		for _, k := range kinds {
			s := res[k.label][n]
			fmt.Fprintf(&b, "| %s | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.2f |\n", k.label, n, len(s.hook),
				ms(pct(s.hook, .5)), ms(pct(s.hook, .99)), ms(pct(s.hook, .99)-pct(r.hook, .99)), ms(pct(s.hook, .99)-pct(p.hook, .99)),
				ms(pct(s.both, .5)), ms(pct(s.both, .99)), ms(pct(s.both, .99)-pct(r.both, .99)), ms(pct(s.both, .99)-pct(p.both, .99)),
				ms(pct(s.start, .5)), ms(pct(s.start, .99)), float64(pct(s.start, .99))/float64(pct(r.start, .99)))
		}
	}
	return b.String()
}

// hostdReport is nkp-hostd's share of the protected kinds' prepare hook: its own metric
// (nkp_hostd_hook_duration_seconds, from the request read to the reply handed to the
// socket), as the upper bounds of the histogram buckets that hold p50 and p99.
func hostdReport(kinds []*kind, conc []int, res map[string]map[int]*sample) string {
	var b strings.Builder
	for _, n := range conc {
		for _, k := range kinds {
			h := res[k.label][n].hostd
			p50, total := h.quantile(.5)
			p99, _ := h.quantile(.99)
			if total == 0 {
				continue
			}
			if b.Len() == 0 {
				fmt.Fprintf(&b, "\nnkp-hostd answering prepare (its metric nkp_hostd_hook_duration_seconds, request read to reply written; the upper bound of the bucket holding p50 and p99, ms)\n\n")
				fmt.Fprintf(&b, "| kind | at once | answers | hostd p50 ≤ | hostd p99 ≤ |\n|---|---:|---:|---:|---:|\n")
			}
			fmt.Fprintf(&b, "| %s | %d | %.0f | %g | %g |\n", k.label, n, total, p50*1000, p99*1000)
		}
	}
	return b.String()
}
