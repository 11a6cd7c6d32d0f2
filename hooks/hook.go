// Package hooks is nkp's libvirt qemu hook, the program installed as
// /etc/libvirt/hooks/qemu.d/nkp (cmd/nkp-hook is its main).
//
// libvirtd runs the hook with argv DOMAIN OPERATION SUB-OPERATION EXTRA and the domain XML
// on stdin, and waits for it while holding one of its workers. The hook:
//
//  1. reads the XML; if it does not mention nkp's namespace (hookproto.Protected) the
//     domain is not nkp's and the hook exits 0 at once, without touching any socket,
//     whether hostd runs or not. If reading stdin fails before nkp's namespace and
//     before the end of the domain (</domain>), the hook cannot tell whose domain it is:
//     it refuses operations that start a VM (and unknown ones) with a sentence saying
//     so, and passes the others with a warning;
//  2. otherwise forwards (domain, operation, sub-operation, extra, XML) to nkp-hostd over
//     its root-only unix socket, in hookproto's binary framing (version 2), and waits
//     for the answer, at most Config.Timeout (OptionalTimeout for operations that are
//     not hookproto.Required);
//  3. exits 0 when hostd allows, 1 when it refuses, printing hostd's sentence on stderr
//     (virsh shows it to the user). When hostd cannot be asked, operations that start a
//     VM (hookproto.Required) fail closed with a sentence naming the VM, the key ID and
//     what to do; the others pass with a warning, since hostd reconciles them from
//     libvirt's events and refusing them would only harm running VMs.
//
// It never writes to stdout: for the migrate and restore operations libvirt would take
// any output as a replacement domain XML.
//
// Configuration (libvirt passes a fixed argv): leading flags --socket=PATH, --timeout=D
// and --config=FILE (for a wrapper script), else the environment (NKP_HOOK_SOCKET,
// NKP_HOOK_TIMEOUT, NKP_HOOK_CONFIG), else the config file (default /etc/nkp/hook.conf,
// lines "socket = PATH" and "timeout = 30s", # comments), else the defaults.
//
// Importers: cmd/nkp-hook and tests. It imports hooks/hookproto and the standard library
// only, and no cgo, so that it starts in a few milliseconds. (cmd/nkp-hook, as the
// Makefile builds it, takes step 1's fast path in assembly before the Go runtime starts;
// with nothing configured it also sends step 2's request and takes an allow without a
// message itself, and otherwise hands Run what it read and how far the exchange got, an
// Exchange, which Run decides from without asking hostd again: see its doc.) It talks to hostd over a
// blocking socket whose own timeouts carry the deadline: no package net, no netpoller,
// no timer, so the process has nothing to wake but its one goroutine (on a host where
// many QEMUs start at once, every wake-up of a thread is a wait for a CPU).
package hooks

import (
	"bufio"
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
	"github.com/nkp-dev/nkp/internal/schedslice"
)

// Defaults.
const (
	DefaultSocket  = "/run/nkp/hook.sock"
	DefaultConfig  = "/etc/nkp/hook.conf"
	DefaultTimeout = 30 * time.Second
	// OptionalTimeout bounds the wait for operations that are not hookproto.Required: they
	// pass anyway, so a hung hostd must not hold libvirtd's worker for long.
	OptionalTimeout = 5 * time.Second
)

// Config is where hostd listens and how long the hook waits for it.
type Config struct {
	Socket  string        // hostd's hook socket
	Timeout time.Duration // bounded wait for required operations (dial, send and answer)
}

// Env is the environment lookup the hook uses (os.Getenv in cmd/nkp-hook).
type Env func(string) string

// Main runs the hook with args (os.Args[1:]) and returns the exit status.
func Main(args []string, stdin io.Reader, stderr io.Writer, getenv Env) int {
	return Run(args, stdin, stderr, getenv, Options{})
}

// Options are Run's settings beyond Main's: the defaults the configuration starts from
// (a build or a test may set them), and an exchange with hostd that cmd/nkp-hook's
// assembly entry already began.
type Options struct {
	Socket          string        // hostd's socket when nothing configures one (DefaultSocket if empty)
	Config          string        // the config file when none is named (DefaultConfig if empty)
	Timeout         time.Duration // the timeout when none is configured (DefaultTimeout if 0)
	OptionalTimeout time.Duration // the cap for operations that are not required (OptionalTimeout if 0)
	// Sent, if not nil, is the exchange for this very request that the entry began with
	// the defaults above: Run takes its outcome (and reads the rest of the reply from its
	// socket) instead of sending the request again, since hostd may have acted on it.
	Sent *Exchange
	// SliceSet: the process already asked for a short time slice (cmd/nkp-hook's entry
	// did); otherwise Run asks before it asks hostd (go doc internal/schedslice).
	SliceSet bool
}

func (o Options) withDefaults() Options {
	if o.Socket == "" {
		o.Socket = DefaultSocket
	}
	if o.Config == "" {
		o.Config = DefaultConfig
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.OptionalTimeout <= 0 {
		o.OptionalTimeout = OptionalTimeout
	}
	return o
}

// Run is Main with opts.
func Run(args []string, stdin io.Reader, stderr io.Writer, getenv Env, opts Options) int {
	opts = opts.withDefaults()
	if opts.Sent != nil {
		defer opts.Sent.close()
	}
	ctx := context.Background() // no cancellation, no timer: the deadline bounds the exchange
	xmlDoc, readErr := io.ReadAll(io.LimitReader(stdin, hookproto.MaxRequest))
	protected, tooLarge := hookproto.Protected(xmlDoc), false
	if readErr == nil && len(xmlDoc) == hookproto.MaxRequest {
		// More may follow. nkp's namespace past the limit must not let a protected
		// domain pass as someone else's: look for it in the rest.
		var found bool
		found, tooLarge, readErr = restMentions(stdin, xmlDoc)
		protected = protected || found
	}
	if !protected && readErr != nil && !bytes.Contains(xmlDoc, []byte("</domain>")) {
		// Cut short before the end of the domain: nkp's metadata may be in what was not
		// read. A start fails closed; the rest passes (hostd reconciles them).
		return unreadable(args, readErr, stderr)
	}
	if !protected {
		return 0 // not nkp's domain: the fast path, nothing else is looked at
	}
	if !opts.SliceSet {
		// hostd's answer wakes this process while libvirtd's worker waits for it: a short
		// slice lets that wake-up preempt the QEMUs of a boot storm. A hint; errors ignored.
		_ = schedslice.Set(schedslice.Short)
	}
	cfg, pos, err := configure(args, getenv, opts)
	if err == nil && len(pos) != 4 {
		err = fmt.Errorf("want the 4 arguments DOMAIN OPERATION SUB-OPERATION EXTRA that libvirt passes, got %d", len(pos))
	}
	if err == nil && readErr != nil {
		err = fmt.Errorf("reading the domain XML from stdin: %w", readErr)
	}
	if err == nil && tooLarge {
		err = fmt.Errorf("its domain XML is larger than the %d bytes nkp reads (remove what makes it so large with virsh edit)", hookproto.MaxRequest)
	}
	if err != nil {
		domain := "(unknown)"
		if len(pos) > 0 {
			domain = pos[0]
		}
		fmt.Fprintf(stderr, "nkp: VM %q (vTPM key %s) is protected by nkp but nkp-hook cannot run: %v; check /etc/libvirt/hooks/qemu.d/nkp and %s\n",
			domain, keyID(xmlDoc), err, opts.Config)
		return 1
	}
	req := hookproto.Request{Version: hookproto.Version, Domain: pos[0], Op: pos[1], SubOp: pos[2], Extra: pos[3], XML: string(xmlDoc)}
	timeout := cfg.Timeout
	if !hookproto.Required(req.Op) && timeout > opts.OptionalTimeout {
		timeout = opts.OptionalTimeout
	}
	var reply hookproto.Reply
	if opts.Sent != nil {
		// The entry sent this request already: what it got decides, with the same
		// policy as below; the deadline counts from its start.
		deadline := opts.Sent.Start.Add(timeout)
		reply, err = opts.Sent.ask(ctx, cfg.Socket, req, deadline)
		reply, err = askAgainV1(ctx, cfg.Socket, req, deadline, reply, err)
	} else {
		reply, err = ask(ctx, cfg.Socket, req, time.Now().Add(timeout))
	}
	if err != nil {
		if !hookproto.Required(req.Op) {
			fmt.Fprintf(stderr, "nkp: warning: VM %q %s %s: nkp-hostd could not be told (%v); it will reconcile from libvirt's events when it runs\n",
				req.Domain, req.Op, req.SubOp, err)
			return 0
		}
		fmt.Fprintf(stderr, "nkp: VM %q (vTPM key %s) is protected by nkp and cannot %s: nkp-hostd did not answer on %s (%v); start nkp-hostd (systemctl start nkp-hostd) and try again\n",
			req.Domain, keyID(xmlDoc), verb(req.Op), cfg.Socket, err)
		return 1
	}
	if reply.Message != "" {
		fmt.Fprintln(stderr, strings.TrimRight(reply.Message, "\n"))
	}
	if !reply.Allow {
		return 1
	}
	return 0
}

// unreadable answers a hook whose stdin failed before the end of the domain XML and
// before nkp's namespace: whether the domain is nkp's cannot be told. Operations that
// start a VM (hookproto.Required, or an unknown operation) are refused, since letting a
// protected VM start without its vTPM would break it; the others pass with a warning.
func unreadable(args []string, readErr error, stderr io.Writer) int {
	pos := args
	for len(pos) > 0 && strings.HasPrefix(pos[0], "--") && strings.Contains(pos[0], "=") {
		pos = pos[1:] // the leading flags configure reads
	}
	domain, op := "(unknown)", ""
	if len(pos) > 0 {
		domain = pos[0]
	}
	if len(pos) > 1 {
		op = pos[1]
	}
	if len(pos) == 4 && !hookproto.Required(op) {
		fmt.Fprintf(stderr, "nkp: warning: VM %q %s: nkp-hook could not read its domain XML from libvirt (%v); passing it on, nkp-hostd reconciles from libvirt's events\n", domain, op, readErr)
		return 0
	}
	fmt.Fprintf(stderr, "nkp: VM %q: nkp-hook could not read its domain XML from libvirt (%v), so it cannot tell whether nkp protects this VM, and refuses to %s it rather than start a protected VM without its vTPM; try again, and if it persists check libvirtd's log\n",
		domain, readErr, verb(op))
	return 1
}

// restMentions reads what follows head on r to its end and reports whether nkp's
// namespace occurs there (also across the boundary with head) and whether there was
// anything at all.
func restMentions(r io.Reader, head []byte) (found, more bool, err error) {
	ns := []byte(hookproto.Namespace)
	carry := head[max(0, len(head)-len(ns)+1):]
	buf := make([]byte, 0, 64<<10+len(ns))
	buf = append(buf, carry...)
	for {
		n, rerr := r.Read(buf[len(buf):cap(buf)])
		if n > 0 {
			more = true
			buf = buf[:len(buf)+n]
			if hookproto.Protected(buf) {
				found = true
			}
			k := copy(buf, buf[max(0, len(buf)-len(ns)+1):])
			buf = buf[:k]
		}
		if rerr == io.EOF {
			return found, more, nil
		}
		if rerr != nil {
			return found, more, rerr
		}
	}
}

func verb(op string) string {
	switch op {
	case hookproto.OpPrepare, hookproto.OpStart:
		return "start"
	case hookproto.OpMigrate:
		return "migrate in"
	case hookproto.OpRestore:
		return "be restored"
	}
	return "pass the " + op + " hook"
}

// Ask sends one request to hostd's hook socket and returns its reply. ctx bounds the
// whole exchange (without a deadline, DefaultTimeout does).
func Ask(ctx context.Context, socket string, req hookproto.Request) (hookproto.Reply, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultTimeout)
	}
	if err := ctx.Err(); err != nil {
		return hookproto.Reply{}, limitErr(ctx, err)
	}
	return ask(ctx, socket, req, deadline)
}

// ask is Ask with the deadline given apart, so that Main needs no context timer: a
// timer is one more thing the Go runtime may wake a thread for, and every thread of
// the hook has to get a CPU before the process can exit.
//
// It asks in version 2's framing, and once more in version 1's when a hostd of the last
// release refuses that unread (askAgainV1).
func ask(ctx context.Context, socket string, req hookproto.Request, deadline time.Time) (hookproto.Reply, error) {
	reply, err := askIn(ctx, socket, req, deadline, hookproto.Version2)
	return askAgainV1(ctx, socket, req, deadline, reply, err)
}

// askIn is ask with the request in the framing of version v (1 or 2).
func askIn(ctx context.Context, socket string, req hookproto.Request, deadline time.Time, v int) (hookproto.Reply, error) {
	c, err := dialUnix(socket, deadline)
	if err != nil {
		return hookproto.Reply{}, err
	}
	defer c.Close()
	stop := c.closeOnCancel(ctx)
	defer stop()
	return exchangeIn(ctx, c, req, v)
}

// askAgainV1 asks again in version 1's framing when a version 2 request was refused in
// version 1's framing: only a hostd of the last release answers so, and it refuses every
// version 2 request unread ("could not read the hook's request") without acting on it,
// so the request is sent again, once, in the framing it reads. Between installing a new
// release and restarting nkp-hostd, protected VMs thus keep starting. Any other outcome
// is returned as it is.
func askAgainV1(ctx context.Context, socket string, req hookproto.Request, deadline time.Time, reply hookproto.Reply, err error) (hookproto.Reply, error) {
	if err != nil || reply.Allow || reply.Version == hookproto.Version2 {
		return reply, err
	}
	return askIn(ctx, socket, req, deadline, hookproto.Version)
}

// exchange sends req on c and reads the reply.
func exchange(ctx context.Context, c io.ReadWriter, req hookproto.Request) (hookproto.Reply, error) {
	return exchangeIn(ctx, c, req, hookproto.Version2)
}

// exchangeIn is exchange with the request in the framing of version v (1 or 2).
func exchangeIn(ctx context.Context, c io.ReadWriter, req hookproto.Request, v int) (hookproto.Reply, error) {
	write := hookproto.WriteRequest2
	if v != hookproto.Version2 {
		req.Version = hookproto.Version
		write = hookproto.WriteRequest
	}
	if err := write(c, req); err != nil {
		return hookproto.Reply{}, fmt.Errorf("sending the request: %w", limitErr(ctx, err))
	}
	reply, err := hookproto.ReadReplyAny(bufio.NewReader(c))
	if err != nil {
		return hookproto.Reply{}, limitErr(ctx, err)
	}
	return reply, nil
}

// limitErr says that the time limit was reached (or the exchange cancelled) when that
// is why err happened.
func limitErr(ctx context.Context, err error) error {
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("no answer within the hook's time limit: %w", ctx.Err())
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("no answer within the hook's time limit: %w", err)
	}
	return err
}

// configure reads the leading flags, the environment and the config file; it returns the
// configuration and the positional arguments.
func configure(args []string, getenv Env, opts Options) (Config, []string, error) {
	var flagSocket, flagTimeout, flagConfig string
	for len(args) > 0 && strings.HasPrefix(args[0], "--") {
		name, val, ok := strings.Cut(args[0][2:], "=")
		if !ok {
			break // libvirt's own arguments never look like --name=value
		}
		switch name {
		case "socket":
			flagSocket = val
		case "timeout":
			flagTimeout = val
		case "config":
			flagConfig = val
		default:
			return Config{}, args, fmt.Errorf("unknown flag --%s (known: --socket=, --timeout=, --config=)", name)
		}
		args = args[1:]
	}
	cfg := Config{Socket: opts.Socket, Timeout: opts.Timeout}
	path, explicit := first(flagConfig, getenv("NKP_HOOK_CONFIG")), true
	if path == "" {
		path, explicit = opts.Config, false
	}
	file, err := readConfig(path)
	if err != nil && (explicit || !errors.Is(err, os.ErrNotExist)) {
		return Config{}, args, err
	}
	if s := first(flagSocket, getenv("NKP_HOOK_SOCKET"), file["socket"]); s != "" {
		cfg.Socket = s
	}
	if s := first(flagTimeout, getenv("NKP_HOOK_TIMEOUT"), file["timeout"]); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return Config{}, args, fmt.Errorf("timeout %q: want a positive duration such as 30s", s)
		}
		cfg.Timeout = d
	}
	return cfg, args, nil
}

func first(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// readConfig reads "key = value" lines; unknown keys are an error (a typo must not be
// silently ignored).
func readConfig(path string) (map[string]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("hook config %s: %w", path, err)
	}
	out := map[string]string{}
	for i, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || (k != "socket" && k != "timeout") {
			return nil, fmt.Errorf("hook config %s line %d: want \"socket = PATH\" or \"timeout = DURATION\", got %q", path, i+1, line)
		}
		out[k] = v
	}
	return out, nil
}

// keyID finds the vTPM's key ID in nkp's metadata for a message when hostd cannot say it
// (hostd/domxml's <nkp:object name="vtpm" key-id="…"/>): the key-id attribute of the
// element in nkp's namespace that is the vTPM (name="vtpm", or an element called vtpm),
// else of the first element in it that has one; "(unknown)" if there is none.
func keyID(doc []byte) string {
	d := xml.NewDecoder(bytes.NewReader(doc))
	var any string
	for {
		tok, err := d.Token()
		if err != nil {
			break
		}
		se, ok := tok.(xml.StartElement)
		if !ok || se.Name.Space != hookproto.Namespace {
			continue
		}
		id, vtpm := "", se.Name.Local == "vtpm"
		for _, a := range se.Attr {
			switch a.Name.Local {
			case "key-id":
				id = a.Value
			case "name":
				vtpm = vtpm || a.Value == "vtpm"
			}
		}
		if id == "" {
			continue
		}
		if vtpm {
			return printable(id)
		}
		if any == "" {
			any = printable(id)
		}
	}
	if any == "" {
		return "(unknown)"
	}
	return any
}

// printable keeps a value from the XML short and free of control characters for stderr.
func printable(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
	if len(s) > 64 {
		s = s[:64] + "…"
	}
	return s
}
