package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The measured commands, in table order.
const (
	opGetRandom = "GetRandom(32)"
	opPCRExtend = "PCR_Extend (SHA-256)"
	opNVWrite   = "NV_Write (64 B)"
	opCreate    = "CreatePrimary ECC P-256 + Flush"
)

var ops = []string{opGetRandom, opPCRExtend, opNVWrite, opCreate}

// side is what was measured for one backend.
type side struct {
	lat        map[string][]time.Duration // per command, sorted
	cpu        map[string]time.Duration   // server CPU time per call, per command
	startReady []time.Duration            // sorted
	startCPU   []time.Duration            // server CPU time until ready, sorted
	mem        []memory                   // per idle instance
	afterIdle  []time.Duration            // GetRandom after idleGap, sorted
	warm       []time.Duration            // GetRandom right after that one, sorted
}

// report is one run's result.
type report struct {
	cfg        config
	a, b       side
	start, end time.Time
	load       [2]string // /proc/loadavg before and after
}

// measure runs the three phases against both backends.
func measure(ctx context.Context, cfg config, progress io.Writer) (*report, error) {
	keyFile, err := writeKey(cfg.Work)
	if err != nil {
		return nil, err
	}
	defer os.Remove(keyFile)
	cmds, err := buildCommands()
	if err != nil {
		return nil, err
	}
	rep := &report{cfg: cfg, start: time.Now(), load: [2]string{loadavg(), ""}}
	for _, s := range []*side{&rep.a, &rep.b} {
		s.lat, s.cpu = map[string][]time.Duration{}, map[string]time.Duration{}
	}
	backends := [2]backend{cfg.A, cfg.B}
	sides := [2]*side{&rep.a, &rep.b}
	dirs := [2]string{filepath.Join(cfg.Work, "a"), filepath.Join(cfg.Work, "b")}

	fmt.Fprintf(progress, "latency: %d calls per command, %d CreatePrimary\n", cfg.N, cfg.NCreate)
	if err := measureLatency(ctx, cfg, cmds, backends, dirs, keyFile, sides); err != nil {
		return nil, err
	}
	fmt.Fprintf(progress, "start-to-ready: %d starts each\n", cfg.Starts)
	if err := measureStarts(ctx, cfg, backends, dirs, keyFile, sides); err != nil {
		return nil, err
	}
	if cfg.AfterIdle > 0 {
		fmt.Fprintf(progress, "first command after %v idle: %d rounds\n", idleGap, cfg.AfterIdle)
		if err := measureAfterIdle(ctx, cfg, cmds, backends, dirs, keyFile, sides); err != nil {
			return nil, err
		}
	}
	for i, b := range backends {
		fmt.Fprintf(progress, "memory: %d idle instances of %s\n", cfg.Idle, b.Name)
		m, err := measureIdle(ctx, cfg, b, filepath.Join(dirs[i], "idle"), keyFile)
		if err != nil {
			return nil, err
		}
		sides[i].mem = m
	}
	rep.end, rep.load[1] = time.Now(), loadavg()
	return rep, nil
}

// started is a running backend with its control and data connections.
type started struct {
	in   *instance
	ctrl net.Conn
	data *dataConn
}

func startReady(ctx context.Context, b backend, dir, keyFile string, kp keyPassing) (*started, error) {
	in, err := startInstance(b, dir, keyFile, kp)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ctrl, err := in.waitReady(rctx)
	if err != nil {
		in.stop(nil, 2*time.Second)
		return nil, fmt.Errorf("%s: %w: %w", b.Name, errBackend, err)
	}
	return &started{in: in, ctrl: ctrl}, nil
}

func (s *started) stop() error {
	if s.data != nil {
		s.data.Close()
	}
	return s.in.stop(s.ctrl, 5*time.Second)
}

// startBoth starts each backend on new state in dirs[i]/sub and dials its data
// channel. stop stops the ones that started; call it on error too.
func startBoth(ctx context.Context, cfg config, backends [2]backend, dirs [2]string, sub, keyFile string) (run [2]*started, stop func(), err error) {
	stop = func() {
		for _, s := range run {
			if s != nil {
				s.stop()
			}
		}
	}
	for i, b := range backends {
		s, err := startReady(ctx, b, filepath.Join(dirs[i], sub), keyFile, cfg.Key)
		if err != nil {
			return run, stop, err
		}
		run[i] = s
		if s.data, err = dialData(s.in.data); err != nil {
			return run, stop, fmt.Errorf("%s: %w: %w", b.Name, errBackend, err)
		}
	}
	return run, stop, nil
}

// measureLatency runs both backends at once and times each command on one
// data connection per backend, alternating which backend goes first.
func measureLatency(ctx context.Context, cfg config, cmds commands, backends [2]backend, dirs [2]string, keyFile string, sides [2]*side) error {
	run, stop, err := startBoth(ctx, cfg, backends, dirs, "tpm", keyFile)
	defer stop()
	if err != nil {
		return err
	}
	var nv [2][]byte
	for i, b := range backends {
		if err := defineNV(run[i].data); err != nil {
			return fmt.Errorf("%s: %w: %w", b.Name, errBackend, err)
		}
		nv[i] = slices.Clone(cmds.nvWrite)
	}
	// one call of a command on backend i, returning its duration
	call := func(i int, op string) (time.Duration, error) {
		d := run[i].data
		switch op {
		case opGetRandom:
			return timed(d, cmds.getRandom)
		case opPCRExtend:
			return timed(d, cmds.pcrExtend)
		case opNVWrite:
			nv[i][len(nv[i])-3]++ // new data: libtpms stores nothing for an unchanged NV
			return timed(d, nv[i])
		case opCreate:
			t0 := time.Now()
			rsp, err := d.roundTrip(cmds.createPrimary)
			if err != nil {
				return 0, err
			}
			if rc := responseCode(rsp); rc != 0 || len(rsp) < 14 {
				return 0, fmt.Errorf("CreatePrimary: rc 0x%x", rc)
			}
			h := uint32(rsp[10])<<24 | uint32(rsp[11])<<16 | uint32(rsp[12])<<8 | uint32(rsp[13])
			if _, err := timed(d, flushCommand(h)); err != nil {
				return 0, fmt.Errorf("FlushContext: %w", err)
			}
			return time.Since(t0), nil
		}
		return 0, fmt.Errorf("unknown command %q", op)
	}
	for _, op := range ops {
		n := cfg.N
		if op == opCreate {
			n = cfg.NCreate
		}
		var cpu0 [2]time.Duration
		for i := range 2 {
			sides[i].lat[op] = make([]time.Duration, 0, n)
			c, err := cpuTime(run[i].in.pid())
			if err != nil {
				return err
			}
			cpu0[i] = c
		}
		for i := range 2 { // untimed warm-up, each backend alone
			for range cfg.Warmup {
				if _, err := call(i, op); err != nil {
					return fmt.Errorf("%s %s: %w: %w", backends[i].Name, op, errBackend, err)
				}
			}
		}
		// Timed calls in blocks, the backends taking turns block by block and
		// who goes first alternating: both meet the same machine noise, and
		// neither runs right after the other's every call (a Go server's idle
		// threads keep spinning for a moment after each response).
		for first, blk := 0, 0; first < n; first, blk = first+cfg.Block, blk+1 {
			size := min(cfg.Block, n-first)
			for j := range 2 {
				i := (j + blk) & 1
				for range size {
					if err := ctx.Err(); err != nil {
						return err
					}
					d, err := call(i, op)
					if err != nil {
						return fmt.Errorf("%s %s: %w: %w", backends[i].Name, op, errBackend, err)
					}
					sides[i].lat[op] = append(sides[i].lat[op], d)
				}
			}
		}
		for i := range 2 {
			slices.Sort(sides[i].lat[op])
			c, err := cpuTime(run[i].in.pid())
			if err != nil {
				return err
			}
			sides[i].cpu[op] = (c - cpu0[i]) / time.Duration(n+cfg.Warmup)
		}
	}
	return nil
}

// timed sends one command and checks that it succeeded.
func timed(d *dataConn, cmd []byte) (time.Duration, error) {
	t0 := time.Now()
	rsp, err := d.roundTrip(cmd)
	el := time.Since(t0)
	if err != nil {
		return 0, err
	}
	if rc := responseCode(rsp); rc != 0 {
		return 0, fmt.Errorf("TPM rc 0x%x", rc)
	}
	return el, nil
}

// measureStarts starts each backend cfg.Starts times on the state the
// latency phase left, timing process start until GET_CAPABILITY is answered.
func measureStarts(ctx context.Context, cfg config, backends [2]backend, dirs [2]string, keyFile string, sides [2]*side) error {
	for k := range cfg.Starts {
		for j := range 2 {
			i := (j + k) & 1
			t0 := time.Now()
			s, err := startReady(ctx, backends[i], filepath.Join(dirs[i], "tpm"), keyFile, cfg.Key)
			if err != nil {
				return err
			}
			el := time.Since(t0)
			cpu, err := cpuTime(s.in.pid())
			if err != nil {
				s.stop()
				return err
			}
			if err := s.stop(); err != nil {
				return fmt.Errorf("%s: %w: %w", backends[i].Name, errBackend, err)
			}
			sides[i].startReady = append(sides[i].startReady, el)
			sides[i].startCPU = append(sides[i].startCPU, cpu)
		}
	}
	for i := range 2 {
		slices.Sort(sides[i].startReady)
		slices.Sort(sides[i].startCPU)
	}
	return nil
}

// measureIdle starts n instances of b, each on its own new state, waits until
// all are ready and reads their memory.
func measureIdle(ctx context.Context, cfg config, b backend, dir, keyFile string) ([]memory, error) {
	var all []*started
	defer func() {
		for _, s := range all {
			s.stop()
		}
	}()
	for i := range cfg.Idle {
		s, err := startReady(ctx, b, filepath.Join(dir, fmt.Sprint(i)), keyFile, cfg.Key)
		if err != nil {
			return nil, err
		}
		all = append(all, s)
	}
	// Idle means idle: nkp-swtpm trims its start-up mappings after 2 s without a
	// command, and both backends get the same wait.
	select {
	case <-time.After(cfg.Settle):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	mem := make([]memory, 0, len(all))
	for _, s := range all {
		m, err := readMemory(s.in.pid())
		if err != nil {
			return nil, err
		}
		mem = append(mem, m)
	}
	return mem, nil
}

// percentile returns the q-quantile (0 < q <= 1) of sorted samples by the
// nearest-rank method.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	k := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(k, len(sorted)-1))]
}

// loadavg returns the first three fields of /proc/loadavg.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// idleGap is the idle time before each -after-idle call: past nkp-swtpm's 2 s idle
// trim (swtpm.DefaultIdleTrim).
const idleGap = 3 * time.Second

// measureAfterIdle runs one instance of each backend side by side and, cfg.AfterIdle
// times, lets both idle for idleGap, then times a GetRandom on each (who goes first
// alternating) and a second one right after it.
func measureAfterIdle(ctx context.Context, cfg config, cmds commands, backends [2]backend, dirs [2]string, keyFile string, sides [2]*side) error {
	run, stop, err := startBoth(ctx, cfg, backends, dirs, "afteridle", keyFile)
	defer stop()
	if err != nil {
		return err
	}
	for r := range cfg.AfterIdle {
		select {
		case <-time.After(idleGap):
		case <-ctx.Done():
			return ctx.Err()
		}
		for j := range 2 {
			i := (j + r) & 1
			cold, err := timed(run[i].data, cmds.getRandom)
			if err != nil {
				return fmt.Errorf("%s GetRandom after idle: %w: %w", backends[i].Name, errBackend, err)
			}
			warm, err := timed(run[i].data, cmds.getRandom)
			if err != nil {
				return fmt.Errorf("%s GetRandom: %w: %w", backends[i].Name, errBackend, err)
			}
			sides[i].afterIdle = append(sides[i].afterIdle, cold)
			sides[i].warm = append(sides[i].warm, warm)
		}
	}
	for _, s := range sides {
		slices.Sort(s.afterIdle)
		slices.Sort(s.warm)
	}
	return nil
}
