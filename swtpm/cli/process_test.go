package cli

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/swtpm/state"
)

func TestPrefixWriter(t *testing.T) {
	tests := []struct {
		prefix string
		writes []string
		want   string
	}{
		{"swtpm: ", []string{"a\n"}, "swtpm: a\n"},
		{"> ", []string{"a\nb\n", "c\n"}, "> a\n> b\n> c\n"},
		{"> ", []string{"no newline"}, "> no newline"},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		w := &prefixWriter{w: &buf, prefix: []byte(tt.prefix)}
		for _, s := range tt.writes {
			if n, err := w.Write([]byte(s)); err != nil || n != len(s) {
				t.Fatalf("Write(%q) = %d, %v", s, n, err)
			}
		}
		if buf.String() != tt.want {
			t.Errorf("prefix %q writes %q gave %q, want %q", tt.prefix, tt.writes, buf.String(), tt.want)
		}
	}
}

func TestOpenLog(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.log")
	if err := os.WriteFile(existing, []byte("old line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		opts     *cmdline.LogOptions
		wantFile string // file to inspect; "" for stderr
		wantOld  bool   // the old content is kept
		wantLine string // "" when nothing must be logged
	}{
		{"stderr without --log", nil, "", false, "msg=hello"},
		{"new file", &cmdline.LogOptions{File: filepath.Join(dir, "new.log"), FD: -1}, filepath.Join(dir, "new.log"), false, "msg=hello"},
		{"append", &cmdline.LogOptions{File: existing, FD: -1, Prefix: "P: "}, existing, true, "P: time="},
		{"truncate", &cmdline.LogOptions{File: filepath.Join(dir, "t.log"), FD: -1, Truncate: true}, filepath.Join(dir, "t.log"), false, "msg=hello"},
		{"disabled", &cmdline.LogOptions{File: "-", FD: -1}, "", false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			log, closeLog, err := openLog(tt.opts, &stderr)
			if err != nil {
				t.Fatal(err)
			}
			log.Info("hello")
			log.Debug("debug only")
			closeLog()
			got := stderr.String()
			if tt.wantFile != "" {
				b, err := os.ReadFile(tt.wantFile)
				if err != nil {
					t.Fatal(err)
				}
				got = string(b)
				fi, _ := os.Stat(tt.wantFile)
				if tt.wantFile != existing && fi.Mode().Perm() != 0o600 {
					t.Errorf("log file mode %v, want 0600", fi.Mode().Perm())
				}
			}
			if tt.wantLine == "" && got != "" {
				t.Errorf("logged %q, want nothing", got)
			}
			if !strings.Contains(got, tt.wantLine) {
				t.Errorf("log %q, want it to contain %q", got, tt.wantLine)
			}
			if strings.Contains(got, "old line") != tt.wantOld {
				t.Errorf("old content kept = %v, want %v", !tt.wantOld, tt.wantOld)
			}
			if strings.Contains(got, "debug only") {
				t.Errorf("debug logged at the default level: %q", got)
			}
		})
	}
	if _, _, err := openLog(&cmdline.LogOptions{File: filepath.Join(dir, "missing", "x.log"), FD: -1}, os.Stderr); err == nil || !strings.Contains(err.Error(), "--log file=") {
		t.Errorf("log in a missing directory: err = %v, want one naming --log file=", err)
	}
}

func TestPidFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "swtpm.pid")
	// swtpm_setup creates the file first and watches it: it must be written in place.
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Stat(p)
	remove, err := pidFile(&cmdline.PidOptions{File: p, FD: -1}, 4242)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	after, _ := os.Stat(p)
	if string(b) != "4242" {
		t.Errorf("pid file holds %q, want \"4242\" (swtpm writes no newline)", b)
	}
	if !os.SameFile(before, after) {
		t.Errorf("the pid file was replaced by another inode; swtpm_setup would not see it")
	}
	remove()
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("pid file still there after removal: %v", err)
	}

	f, err := os.Create(filepath.Join(dir, "byfd"))
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("stale content that is longer\n")
	fd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pidFile(&cmdline.PidOptions{FD: fd}, 7); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(f.Name()); string(b) != "7" {
		t.Errorf("pid via fd wrote %q, want \"7\"", b)
	}
	f.Close()

	if _, err := pidFile(&cmdline.PidOptions{File: filepath.Join(dir, "no", "dir", "pid"), FD: -1}, 1); err == nil {
		t.Error("pid file in a missing directory: no error")
	}
}

// TestPidLogNoFollow: --pid file= and --log file= refuse a symbolic link (and any
// file that is not regular) with a clear error, and the file behind the link is neither
// truncated nor written.
func TestPidLogNoFollow(t *testing.T) {
	open := map[string]func(path string) error{
		"pid": func(p string) error {
			_, err := pidFile(&cmdline.PidOptions{File: p, FD: -1}, 4242)
			return err
		},
		"log": func(p string) error {
			_, closeLog, err := openLog(&cmdline.LogOptions{File: p}, nil)
			if err == nil {
				closeLog()
			}
			return err
		},
		"log truncate": func(p string) error {
			_, closeLog, err := openLog(&cmdline.LogOptions{File: p, Truncate: true}, nil)
			if err == nil {
				closeLog()
			}
			return err
		},
	}
	for name, fn := range open {
		for _, tt := range []struct {
			kind string
			make func(t *testing.T, path, victim string)
			want string
		}{
			{"symlink to a file", func(t *testing.T, p, victim string) { os.Symlink(victim, p) }, "is a symbolic link"},
			{"dangling symlink", func(t *testing.T, p, victim string) { os.Symlink(victim+".new", p) }, "is a symbolic link"},
			{"fifo", func(t *testing.T, p, victim string) { syscall.Mkfifo(p, 0o600) }, "not a regular file"},
		} {
			t.Run(name+"/"+tt.kind, func(t *testing.T) {
				dir := t.TempDir()
				victim := filepath.Join(dir, "victim")
				os.WriteFile(victim, []byte("precious\n"), 0o600)
				p := filepath.Join(dir, "planted")
				tt.make(t, p, victim)
				err := fn(p)
				if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), p) {
					t.Fatalf("err = %v, want one naming %s and saying %q", err, p, tt.want)
				}
				if b, _ := os.ReadFile(victim); string(b) != "precious\n" {
					t.Errorf("the file behind the link now holds %q", b)
				}
				if _, err := os.Lstat(victim + ".new"); err == nil {
					t.Errorf("a file was created through a dangling link")
				}
			})
		}
	}
}

func TestChannelOpen(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctrl.sock")
	// A stale file where the socket goes is replaced, as swtpm does.
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ep, err := openChannel(&cmdline.Channel{Type: cmdline.TypeUnixIO, Path: sock, Port: -1, ListenFD: -1, ConnFD: -1, Mode: 0o660, UID: strconv.Itoa(os.Getuid())}, "ctrl")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket file %v, %v; want a socket with mode 0660", fi, err)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial the created socket: %v", err)
	}
	c.Close()
	ep.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket file left after Close: %v", err)
	}

	// Inherited fds: a listening socket and a connected one.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lf, _ := l.(*net.TCPListener).File()
	l.Close()
	ep, err = openChannel(&cmdline.Channel{Type: cmdline.TypeTCP, Port: -1, ListenFD: int(lf.Fd()), ConnFD: -1}, "ctrl")
	if err != nil || ep.Listener == nil {
		t.Fatalf("listen fd: %v, %+v", err, ep)
	}
	ep.Close()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fds[0])
	ep, err = openChannel(&cmdline.Channel{Type: cmdline.TypeTCP, Port: -1, ListenFD: -1, ConnFD: fds[1]}, "server")
	if err != nil || ep.Conn == nil {
		t.Fatalf("conn fd: %v, %+v", err, ep)
	}
	ep.Close()

	// Errors name the option and the cause.
	for _, c := range []*cmdline.Channel{
		{Type: cmdline.TypeUnixIO, Path: filepath.Join(dir, "missing", "s"), Port: -1, ListenFD: -1, ConnFD: -1, Mode: 0o600},
		{Type: cmdline.TypeUnixIO, Path: filepath.Join(dir, "s2"), Port: -1, ListenFD: -1, ConnFD: -1, Mode: 0o600, UID: "no-such-user-nkp"},
		{Type: cmdline.TypeTCP, Port: -1, ListenFD: int(os.Stdin.Fd()) + 100, ConnFD: -1},
	} {
		if _, err := openChannel(c, "ctrl"); err == nil || !strings.HasPrefix(err.Error(), "--ctrl") {
			t.Errorf("Open(%+v) = %v, want an error starting with --ctrl", c, err)
		}
	}
}

func TestKeySpec(t *testing.T) {
	tests := []struct {
		opt  string
		want state.KeySpec
	}{
		{"file=/k", state.KeySpec{Source: state.KeyFile, Path: "/k", FD: -1, Format: "hex"}},
		{"fd=5,mode=aes-256-cbc,format=binary", state.KeySpec{Source: state.KeyFD, FD: 5, Format: "binary", Mode: "aes-256-cbc"}},
		{"pwdfile=/p,remove", state.KeySpec{Source: state.PwdFile, Path: "/p", FD: -1, KDF: envelope.KDFPBKDF2, Remove: true}},
		{"pwdfd=9,kdf=sha512,mode=aes-cbc", state.KeySpec{Source: state.PwdFD, FD: 9, KDF: envelope.KDFSHA512, Mode: "aes-128-cbc"}},
	}
	for _, tt := range tests {
		o, err := cmdline.Parse([]string{"--tpm2", "--key", tt.opt})
		if err != nil {
			t.Fatalf("Parse(--key %s): %v", tt.opt, err)
		}
		k := o.Key
		if got := keySpec(k); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("KeySpec(%s) = %+v, want %+v", tt.opt, got, tt.want)
		}
		// The state package's own parser of the same text agrees on what matters.
		ref, err := state.ParseKeySpec(tt.opt)
		if err != nil {
			t.Fatalf("state.ParseKeySpec(%s): %v", tt.opt, err)
		}
		if got := keySpec(k); got.Source != ref.Source || got.Path != ref.Path || got.FD != ref.FD || got.Remove != ref.Remove {
			t.Errorf("KeySpec(%s) = %+v, state.ParseKeySpec = %+v", tt.opt, got, ref)
		}
	}
}

// TestTCPBindAddr: bindaddr= takes IPv4 and IPv6 addresses, ifname= the zone of a
// link-local one; a host name is refused as swtpm 0.7.1 refuses it ("Could not parse
// the bind address 'localhost'"), not looked up.
func TestTCPBindAddr(t *testing.T) {
	for _, tc := range []struct {
		bind, ifname string
		want         string // TCPAddr.String, or "" for an error
		listen       bool   // also listen on port 0 there
	}{
		{bind: "127.0.0.1", want: "127.0.0.1:2321", listen: true},
		{bind: "0.0.0.0", want: "0.0.0.0:2321"},
		{bind: "::1", want: "[::1]:2321"},
		{bind: "fe80::1", ifname: "eth0", want: "[fe80::1%eth0]:2321"},
		{bind: "fe80::1%eth1", want: "[fe80::1%eth1]:2321"},
		{bind: "localhost"},
		{bind: "127.0.0.1:80"},
		{bind: ""},
	} {
		c := &cmdline.Channel{Type: cmdline.TypeTCP, BindAddr: tc.bind, IfName: tc.ifname, Port: 2321, ListenFD: -1, ConnFD: -1}
		a, err := tcpAddr(c)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("bindaddr=%q: got %v, want an error", tc.bind, a)
		case tc.want == "" && !strings.Contains(err.Error(), "bindaddr="+tc.bind+" is not an IPv4 or IPv6 address"):
			t.Errorf("bindaddr=%q: error %q does not name the address and the reason", tc.bind, err)
		case tc.want != "" && (err != nil || a.String() != tc.want):
			t.Errorf("bindaddr=%q ifname=%q: got %v, %v; want %s", tc.bind, tc.ifname, a, err, tc.want)
		}
		if !tc.listen {
			continue
		}
		c.Port = 0
		ep, err := openChannel(c, "server")
		if err != nil {
			t.Fatalf("listen on bindaddr=%s: %v", tc.bind, err)
		}
		conn, err := net.Dial("tcp", ep.Listener.Addr().String())
		if err != nil {
			t.Errorf("dial %s: %v", ep.Listener.Addr(), err)
		} else {
			conn.Close()
		}
		ep.Close()
	}
	if _, err := openChannel(&cmdline.Channel{Type: cmdline.TypeTCP, BindAddr: "localhost", Port: 0, ListenFD: -1, ConnFD: -1}, "ctrl"); err == nil || !strings.HasPrefix(err.Error(), "--ctrl: bindaddr=localhost") {
		t.Errorf("openChannel(bindaddr=localhost) = %v, want an error starting with --ctrl: bindaddr=localhost", err)
	}
}
