// Command swtpmbench measures two swtpm-compatible vTPM backends in one run,
// by default Debian's swtpm and nkp's nkp-swtpm, both on unix sockets and both
// with encrypted state, and prints a markdown table with each value and the
// ratio candidate ÷ baseline:
//
//   - p50 and p99 latency of GetRandom(32), PCR_Extend, NV_Write (64 bytes to
//     a defined index, new data each time) and CreatePrimary ECC P-256 +
//     FlushContext, all over one data connection, the two backends taking
//     turns in blocks of -block calls so that both see the same machine noise;
//   - start-to-ready: process start until the control socket answers
//     GET_CAPABILITY (median of -starts, existing state, turns alternating);
//   - RSS and PSS (from /proc/PID/smaps_rollup) per instance of -idle idle
//     instances of each, read -settle (default 5 s) after the last of them was
//     ready, for both backends alike: long enough for nkp-swtpm's idle trim (2 s
//     without a command; go doc ./swtpm, "Idle trim") to have run, so that the
//     figure is that of an idle vTPM, not of one that just started (-settle 0
//     reads at once, as before);
//   - with -after-idle N: GetRandom(32) as the first command after 3 s of idle
//     (for nkp-swtpm, after its idle trim dropped its mappings: the call takes
//     the page faults back) and the call right after it, median of N rounds, both
//     backends idle side by side.
//
// The state key is 32 random bytes written as hex to a 0600 file in the work
// directory and given as --key fd=3 (or file=) with mode=aes-256-cbc; it
// never appears in argv or the environment. Usage:
//
//	go run ./test/bench/swtpmbench -out BENCHMARKS.swtpm.md
//	go run ./test/bench/swtpmbench -b swtpm -b-label "swtpm (again)"   # calibration
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "swtpmbench:", err)
		os.Exit(1)
	}
}

// config is what one run measures.
type config struct {
	A, B      backend       // baseline and candidate; ratios are B ÷ A
	N         int           // timed calls per fast command and backend
	NCreate   int           // timed CreatePrimary+Flush pairs per backend
	Warmup    int           // untimed calls of each command first
	Block     int           // timed calls in a row on one backend before the other's turn
	Starts    int           // start-to-ready samples per backend
	Idle      int           // idle instances per backend for RSS/PSS
	Settle    time.Duration // wait after the idle instances are ready, before reading their memory
	AfterIdle int           // rounds of the first-command-after-idle phase (0: none)
	Key       keyPassing    // fd or file
	Work      string        // work directory; a temporary one when empty
	Keep      bool          // keep the work directory
	Out       string        // also write the table here
	CPUs      string        // pin the client and the backends to these CPUs ("" = no pinning)
	Runs      int           // whole runs one after the other; the table gives medians
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("swtpmbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c config
	fs.StringVar(&c.A.Path, "a", "swtpm", "baseline program (run as `PROG socket ...`)")
	fs.StringVar(&c.A.Name, "a-label", "", "baseline column heading (default: the program's version line)")
	fs.StringVar(&c.B.Path, "b", "bin/nkp-swtpm", "candidate program (run as `PROG socket ...`)")
	fs.StringVar(&c.B.Name, "b-label", "", "candidate column heading (default: the program's name)")
	fs.IntVar(&c.N, "n", 3000, "timed calls per command (GetRandom, PCR_Extend, NV_Write) and backend")
	fs.IntVar(&c.NCreate, "n-create", 300, "timed CreatePrimary ECC P-256 + FlushContext pairs per backend")
	fs.IntVar(&c.Warmup, "warmup", 50, "untimed calls of each command before timing")
	fs.IntVar(&c.Block, "block", 100, "timed calls in a row on one backend before the other backend's turn (1: call by call)")
	fs.IntVar(&c.Starts, "starts", 20, "start-to-ready samples per backend (the median is reported)")
	fs.IntVar(&c.Idle, "idle", 50, "idle instances per backend for RSS and PSS")
	fs.DurationVar(&c.Settle, "settle", 5*time.Second, "wait this long after the idle instances are ready before reading their memory, for both backends (longer than nkp-swtpm's 2 s idle trim; 0: at once)")
	fs.IntVar(&c.AfterIdle, "after-idle", 0, "rounds of GetRandom after 3 s idle (nkp-swtpm: after its idle trim) and right after that, per backend (0: skip the phase)")
	key := fs.String("key", "fd", "how the state key is passed: fd (--key fd=3) or file (--key file=PATH); both read a 0600 file")
	fs.StringVar(&c.Work, "work", "", "work directory for state, sockets and logs (default: a new temporary directory)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the work directory (logs of the backends)")
	fs.StringVar(&c.Out, "out", "", "also write the markdown table to this file")
	fs.StringVar(&c.CPUs, "cpus", "", "pin the client and both backends to these CPUs, e.g. 1 or 0,1 (default: no pinning)")
	fs.IntVar(&c.Runs, "runs", 1, "whole runs one after the other (each interleaves both backends); the table gives the median of each value and of each run's ratio, and lists every run's ratio")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() != 0 {
		return c, fmt.Errorf("unexpected arguments %q: all settings are flags (see -h)", fs.Args())
	}
	c.Key = keyPassing(*key)
	return c, c.validate()
}

// validate names the flag that is wrong.
func (c config) validate() error {
	switch {
	case c.N < 1:
		return fmt.Errorf("-n %d: need at least 1 call", c.N)
	case c.NCreate < 1:
		return fmt.Errorf("-n-create %d: need at least 1 call", c.NCreate)
	case c.Block < 1:
		return fmt.Errorf("-block %d: need at least 1 call", c.Block)
	case c.Warmup < 0:
		return fmt.Errorf("-warmup %d: must not be negative", c.Warmup)
	case c.Starts < 1:
		return fmt.Errorf("-starts %d: need at least 1 sample", c.Starts)
	case c.Idle < 1:
		return fmt.Errorf("-idle %d: need at least 1 instance", c.Idle)
	case c.AfterIdle < 0:
		return fmt.Errorf("-after-idle %d: must not be negative", c.AfterIdle)
	case c.Settle < 0:
		return fmt.Errorf("-settle %v: must not be negative", c.Settle)
	case c.Runs < 1:
		return fmt.Errorf("-runs %d: need at least 1 run", c.Runs)
	case c.Key != keyByFD && c.Key != keyByFile:
		return fmt.Errorf("-key %q: want fd or file", c.Key)
	}
	if c.CPUs != "" {
		if _, err := parseCPUList(c.CPUs); err != nil {
			return err
		}
	}
	for _, b := range []struct {
		flag string
		path string
	}{{"-a", c.A.Path}, {"-b", c.B.Path}} {
		if _, err := exec.LookPath(b.path); err != nil {
			return fmt.Errorf("%s %s: not an executable program (for nkp-swtpm run `make build` first): %w", b.flag, b.path, err)
		}
	}
	return nil
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	cfg, err := parseFlags(args, os.Stderr)
	if err != nil {
		return err
	}
	if cfg.CPUs != "" {
		set, _ := parseCPUList(cfg.CPUs) // checked by validate
		if err := pinProcess(set); err != nil {
			return err
		}
	}
	if cfg.A.Name == "" {
		cfg.A.Name = versionLabel(cfg.A.Path)
	}
	if cfg.B.Name == "" {
		cfg.B.Name = versionLabel(cfg.B.Path)
	}
	if cfg.Work == "" {
		d, err := os.MkdirTemp("", "swtpmbench-")
		if err != nil {
			return fmt.Errorf("work directory: %w", err)
		}
		cfg.Work = d
	} else if err := os.MkdirAll(cfg.Work, 0o700); err != nil {
		return fmt.Errorf("-work %s: %w", cfg.Work, err)
	}
	if !cfg.Keep {
		defer os.RemoveAll(cfg.Work)
	}
	var reps []report
	for i := range cfg.Runs {
		one := cfg
		if cfg.Runs > 1 {
			fmt.Fprintf(os.Stderr, "run %d of %d\n", i+1, cfg.Runs)
			one.Work = filepath.Join(cfg.Work, fmt.Sprintf("run%d", i+1))
			if err := os.MkdirAll(one.Work, 0o700); err != nil {
				return fmt.Errorf("work directory: %w", err)
			}
		}
		rep, err := measure(ctx, one, os.Stderr)
		if err != nil {
			return err
		}
		reps = append(reps, *rep)
	}
	table := reps[0].markdown()
	if len(reps) > 1 {
		table = markdownRuns(reps)
	}
	if _, err := io.WriteString(stdout, table); err != nil {
		return err
	}
	if cfg.Out != "" {
		if err := os.WriteFile(cfg.Out, []byte(table), 0o644); err != nil {
			return fmt.Errorf("-out %s: %w", cfg.Out, err)
		}
	}
	return nil
}

// versionLabel returns "name version", the version taken from
// `PROG socket --print-capabilities` (JSON, as swtpm_setup and libvirt read
// it) or else `PROG --version`; just the name when neither tells.
func versionLabel(path string) string {
	name := filepath.Base(path)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, path, "socket", "--print-capabilities").Output(); err == nil {
		var caps struct {
			Version string `json:"version"`
		}
		if json.Unmarshal(out, &caps) == nil && caps.Version != "" {
			return name + " " + caps.Version
		}
	}
	out, _ := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if v := findVersion(string(out)); v != "" {
		return name + " " + v
	}
	return name
}

// findVersion returns the first word of s that looks like a dotted version.
func findVersion(s string) string {
	for _, f := range strings.Fields(s) {
		f = strings.Trim(f, ",;()v")
		if len(f) > 2 && f[0] >= '0' && f[0] <= '9' && strings.Contains(f, ".") {
			return f
		}
	}
	return ""
}

// writeKey writes a fresh random 256-bit key as 64 hex digits to a 0600 file.
func writeKey(dir string) (string, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("state key: %w", err)
	}
	text := []byte(hex.EncodeToString(raw))
	clear(raw)
	defer clear(text)
	p := filepath.Join(dir, "state.key")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", fmt.Errorf("state key file: %w", err)
	}
	if _, err := f.Write(text); err != nil {
		f.Close()
		return "", fmt.Errorf("state key file %s: %w", p, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("state key file %s: %w", p, err)
	}
	return p, nil
}

// errBackend marks failures of a backend under test, as opposed to the
// benchmark's own.
var errBackend = errors.New("backend failed")
