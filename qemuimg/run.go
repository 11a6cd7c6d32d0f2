package qemuimg

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Tool runs one qemu-img binary. The zero value runs "qemu-img" from PATH and logs nothing.
type Tool struct {
	// Path is the qemu-img binary; empty means "qemu-img" looked up in PATH.
	Path string
	// Logger receives one debug line per call (the argv, which never holds a key).
	Logger *slog.Logger
}

func (t *Tool) bin() string {
	if t == nil || t.Path == "" {
		return "qemu-img"
	}
	return t.Path
}

func (t *Tool) logger() *slog.Logger {
	if t == nil || t.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return t.Logger
}

// secrets collects the keys of one call. Each attempt hands every key to qemu-img through
// a new pipe, inherited as fd 3, 4, … and named `--object secret,id=secN,file=/dev/fd/N`.
// The copies are wiped when the call ends.
type secrets struct {
	keys [][]byte
}

// add keeps a copy of key and returns the secret's id for option strings.
func (s *secrets) add(key []byte) string {
	id := "sec" + strconv.Itoa(len(s.keys))
	s.keys = append(s.keys, append([]byte(nil), key...))
	return id
}

// addIf adds key as a secret if it is set, and returns "" otherwise.
func (s *secrets) addIf(key []byte) string {
	if len(key) == 0 {
		return ""
	}
	return s.add(key)
}

func (s *secrets) args() []string {
	var a []string
	for i := range s.keys {
		a = append(a, "--object", fmt.Sprintf("secret,id=sec%d,file=/dev/fd/%d", i, 3+i))
	}
	return a
}

// pipes returns the read ends of fresh pipes that hold the keys, in order.
func (s *secrets) pipes() ([]*os.File, error) {
	var files []*os.File
	for _, k := range s.keys {
		r, w, err := os.Pipe()
		if err != nil {
			closeAll(files)
			return nil, fmt.Errorf("pipe for a qemu-img secret: %w", err)
		}
		// A key is at most a few hundred bytes, far below a pipe's buffer: the write
		// completes before qemu-img runs, and closing the write end gives it EOF after.
		_, werr := w.Write(k)
		if err := errors.Join(werr, w.Close()); err != nil {
			r.Close()
			closeAll(files)
			return nil, fmt.Errorf("writing a qemu-img secret to its pipe: %w", err)
		}
		files = append(files, r)
	}
	return files, nil
}

func (s *secrets) close() {
	for _, k := range s.keys {
		clear(k)
	}
	s.keys = nil
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// call is one qemu-img invocation.
type call struct {
	op       string   // "create", "convert", … (for errors)
	image    string   // the image the error is about
	args     []string // after the subcommand; secret objects are put in front
	sec      *secrets
	progress func(float64)
}

// result is what a finished qemu-img printed.
type result struct {
	stdout []byte
	code   int
}

// cpuUsageFlake is QEMU's complaint when its PBKDF timing read no CPU time.
const cpuUsageFlake = "Unable to get accurate CPU usage"

// maxFlakeTries bounds the runs of a call that failed with cpuUsageFlake.
const maxFlakeTries = 8

// run runs c and returns its output. A non-zero exit is returned as (result, nil) only
// when okCodes lists it; otherwise it becomes an *Error.
func (t *Tool) run(ctx context.Context, c call, okCodes ...int) (result, error) {
	if c.sec == nil {
		c.sec = &secrets{}
	}
	defer c.sec.close()
	argv := append(append([]string{c.op}, c.sec.args()...), c.args...)
	t.logger().Debug("qemu-img", "argv", argv)
	var (
		res    result
		stderr []byte
		err    error
	)
	for try := 1; ; try++ {
		res, stderr, err = t.once(ctx, c, argv)
		// QEMU times its PBKDF with the thread's CPU clock before it writes a keyslot; on
		// a busy host with tick-based accounting that clock can read 0, and QEMU gives up
		// before changing anything. The same call is then safe to repeat. It fails fast
		// (no CPU spent) and, measured on the 2-core CI machine under load, 5 times in 20,
		// so 3 tries still failed about one call in 60; 8 leave one in 10^5.
		if err == nil || try == maxFlakeTries || ctx.Err() != nil || !bytes.Contains(stderr, []byte(cpuUsageFlake)) {
			break
		}
		t.logger().Debug("qemu-img: PBKDF timing read no CPU time; trying again", "op", c.op, "try", try)
	}
	if err == nil {
		return res, nil
	}
	if ctx.Err() != nil {
		return res, fmt.Errorf("qemu-img %s %s: %w", c.op, c.image, ctx.Err())
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return res, fmt.Errorf("qemu-img %s %s: cannot run %s: %w (install qemu-utils)", c.op, c.image, t.bin(), err)
	}
	res.code = ee.ExitCode()
	for _, ok := range okCodes {
		if res.code == ok {
			return res, nil
		}
	}
	return res, newError(c.op, c.image, res.code, string(stderr), res.stdout)
}

// once runs qemu-img one time.
func (t *Tool) once(ctx context.Context, c call, argv []string) (result, []byte, error) {
	files, err := c.sec.pipes()
	if err != nil {
		return result{}, nil, err
	}
	defer closeAll(files)
	cmd := exec.CommandContext(ctx, t.bin(), argv...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	cmd.ExtraFiles = files
	var stdout, stderr bytes.Buffer
	cmd.Stderr = &limitedWriter{w: &stderr, n: 64 << 10}
	if c.progress == nil {
		cmd.Stdout = &limitedWriter{w: &stdout, n: 16 << 20}
		err = cmd.Run()
		return result{stdout: stdout.Bytes()}, stderr.Bytes(), err
	}
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	done := make(chan struct{})
	go func() {
		defer close(done)
		readProgress(pr, c.progress)
		io.Copy(io.Discard, pr)
	}()
	err = cmd.Run()
	pw.Close()
	<-done
	return result{}, stderr.Bytes(), err
}

// limitedWriter keeps at most n bytes and drops the rest, so a runaway qemu-img cannot
// grow the caller's memory.
type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.n > 0 {
		k := min(len(p), l.n)
		l.w.Write(p[:k])
		l.n -= k
	}
	return len(p), nil
}

// readProgress parses qemu-img -p output, "    (12.34/100%)\r", and reports the fraction
// done (0 to 1), only when it grows.
func readProgress(r io.Reader, report func(float64)) {
	var buf [256]byte
	var line []byte
	last := -1.0
	for {
		n, err := r.Read(buf[:])
		for _, b := range buf[:n] {
			if b != '\r' && b != '\n' {
				if len(line) < 128 {
					line = append(line, b)
				}
				continue
			}
			if f, ok := parseProgress(line); ok && f > last {
				last = f
				report(f)
			}
			line = line[:0]
		}
		if err != nil {
			return
		}
	}
}

// parseProgress reads one qemu-img progress line, "(12.34/100%)", as a fraction.
func parseProgress(line []byte) (float64, bool) {
	s := strings.TrimSpace(string(line))
	if !strings.HasPrefix(s, "(") || !strings.HasSuffix(s, "/100%)") {
		return 0, false
	}
	f, err := strconv.ParseFloat(s[1:len(s)-len("/100%)")], 64)
	if err != nil || f < 0 || f > 100 || f != f {
		return 0, false
	}
	return f / 100, true
}
