package cmdline

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Build returns the argv (without the program name and the "socket" mode word) that
// Parse turns into o, so that `nkp-swtpm socket ARGS...` runs with o. For Options that
// Parse returned, Parse(Build(o)) equals o.
//
// In a hand-written o, fd fields of 0 or less and empty strings are not given, and
// defaults may be left zero (see the package doc); a file mode of 0 is therefore "the
// default" too, never mode=0000. Build refuses what no command line
// can say (a comma inside a sub-option value, which swtpm cannot escape; a connection
// kind an option does not have) and then checks its result with Parse, so every error
// Parse would give for the command line is given here, before any process starts.
func Build(o *Options) ([]string, error) {
	if o == nil {
		return nil, errors.New("cmdline.Build: no options (nil)")
	}
	var b builder
	if o.TPM2 {
		b.flag("tpm2")
	}
	if o.Ctrl != nil {
		b.channel("ctrl", o.Ctrl)
	}
	if o.Server != nil {
		b.server(o.Server)
	}
	if s := o.State; s != nil {
		var so subOpts
		so.str("dir", s.Dir)
		if s.File != "" {
			so.str("backend-uri", "file://"+s.File)
		}
		if !s.ModeDefault && s.Mode != 0 {
			so.mode("mode", uint32(s.Mode))
		}
		so.flag("backup", s.Backup)
		so.flag("fsync", s.Fsync)
		so.flag("accept-rollback", s.AcceptRollback)
		b.sub("tpmstate", so)
	}
	if o.Key != nil {
		b.key("key", o.Key)
	}
	if o.MigrationKey != nil {
		b.key("migration-key", o.MigrationKey)
	}
	if l := o.Log; l != nil {
		var so subOpts
		so.str("file", l.File)
		so.fd("fd", l.FD)
		if l.Level > 0 {
			so.str("level", strconv.FormatUint(uint64(l.Level), 10))
		}
		so.str("prefix", l.Prefix)
		so.flag("truncate", l.Truncate)
		b.sub("log", so)
	}
	if p := o.Pid; p != nil {
		var so subOpts
		so.str("file", p.File)
		so.fd("fd", p.FD)
		b.sub("pid", so)
	}
	if f := o.Flags; f != (FlagsOptions{}) {
		var so subOpts
		so.flag("not-need-init", f.NotNeedInit)
		if f.Startup != "" {
			so.flag("startup-"+f.Startup, true)
		}
		so.flag("disable-auto-shutdown", f.DisableAutoShutdown)
		b.sub("flags", so)
	}
	if l := o.Locality; l != (LocalityOptions{}) {
		var so subOpts
		so.flag("reject-locality-4", l.RejectLocality4)
		so.flag("allow-set-locality", l.AllowSetLocality)
		b.sub("locality", so)
	}
	if m := o.Migration; m != (MigrationOptions{}) {
		var so subOpts
		so.flag("incoming", m.Incoming)
		so.flag("release-lock-outgoing", m.ReleaseLockOutgoing)
		b.sub("migration", so)
	}
	if o.Seccomp != "" {
		var so subOpts
		so.str("action", o.Seccomp)
		b.sub("seccomp", so)
	}
	if o.Terminate {
		b.flag("terminate")
	}
	if o.Daemon {
		b.flag("daemon")
	}
	if o.RunAs != "" {
		b.args = append(b.args, "--runas", o.RunAs)
	}
	for _, f := range []struct {
		set  bool
		name string
	}{{o.PrintCapabilities, "print-capabilities"}, {o.PrintStates, "print-states"}, {o.Help, "help"}, {o.Version, "version"}} {
		if f.set {
			b.flag(f.name)
		}
	}
	if b.err != nil {
		return nil, b.err
	}
	if _, err := Parse(b.args); err != nil {
		return nil, fmt.Errorf("cmdline.Build: the command line %q is refused: %w", strings.Join(b.args, " "), err)
	}
	return b.args, nil
}

// builder collects argv and the first error.
type builder struct {
	args []string
	err  error
}

func (b *builder) flag(name string) { b.args = append(b.args, "--"+name) }

// sub appends "--option a=b,c" unless so is empty; an option whose value would be
// empty is written without one so that Parse names what it needs.
func (b *builder) sub(option string, so subOpts) {
	if so.err != nil && b.err == nil {
		b.err = fmt.Errorf("cmdline.Build: --%s: %w", option, so.err)
	}
	b.args = append(b.args, "--"+option, strings.Join(so.items, ","))
}

// channel writes --ctrl (or a --server of a kind that --server type=... can say).
func (b *builder) channel(option string, c *Channel) {
	var so subOpts
	so.str("type", c.Type)
	typ := c.Type
	if typ == "" && option == "server" {
		typ = TypeTCP // --server's default, as in Parse
	}
	switch typ {
	case "":
		so.fail(errors.New("needs a Type (cmdline.TypeUnixIO or cmdline.TypeTCP), as type= is required"))
	case TypeUnixIO:
		so.str("path", c.Path)
		so.fd("fd", c.ListenFD)
		if option == "ctrl" {
			so.fd("clientfd", c.ConnFD)
		} else if c.ConnFD > 0 {
			so.fail(fmt.Errorf("type=unixio: a connected stream (ConnFD %d) cannot be given with other --server sub-options; only the legacy --fd %d carries it", c.ConnFD, c.ConnFD))
		}
		if c.Path != "" {
			if c.Mode != 0 {
				so.mode("mode", uint32(c.Mode))
			}
			so.str("uid", c.UID)
			so.str("gid", c.GID)
		}
	case TypeTCP:
		fd := c.ListenFD
		if option == "server" {
			// swtpm reads --server type=tcp,fd=N as a connected stream.
			if c.ListenFD > 0 {
				so.fail(fmt.Errorf("type=tcp: a listening socket (ListenFD %d) cannot be passed to --server type=tcp, whose fd= is a connected stream; use type=unixio,fd= or port=", c.ListenFD))
			}
			fd = c.ConnFD
		} else if c.ConnFD > 0 {
			so.fail(fmt.Errorf("type=tcp: a connected stream (ConnFD %d) cannot be passed to --ctrl type=tcp, whose fd= is a listening socket; use type=unixio,clientfd=", c.ConnFD))
		}
		if fd > 0 {
			so.fd("fd", fd)
		} else if c.Port >= 0 {
			so.str("port", strconv.Itoa(c.Port))
		}
		if c.BindAddr != DefaultBindAddr {
			so.str("bindaddr", c.BindAddr)
		}
		so.str("ifname", c.IfName)
	}
	so.flag("terminate", c.Terminate)
	so.flag("disconnect", c.Disconnect)
	b.sub(option, so)
}

// server writes --server, or the legacy --fd N for a connected unix stream, the one
// kind of data channel that --server cannot name.
func (b *builder) server(c *Channel) {
	if c.Type == TypeUnixIO && c.ConnFD > 0 && c.Path == "" && c.ListenFD <= 0 && !c.Disconnect {
		b.args = append(b.args, "--fd", strconv.Itoa(c.ConnFD))
		return
	}
	b.channel("server", c)
}

func (b *builder) key(option string, k *KeyOptions) {
	var so subOpts
	so.str("file", k.File)
	so.fd("fd", k.FD)
	so.str("pwdfile", k.PwdFile)
	so.fd("pwdfd", k.PwdFD)
	so.str("mode", k.Mode)
	if k.PwdFile != "" || k.PwdFD > 0 { // not IsPassphrase: a literal's PwdFD 0 is "not given"
		so.str("kdf", k.KDF)
	} else {
		so.str("format", k.Format)
	}
	so.flag("remove", k.Remove)
	b.sub(option, so)
}

// subOpts collects the sub-options of one option.
type subOpts struct {
	items []string
	err   error
}

func (so *subOpts) fail(err error) {
	if so.err == nil {
		so.err = err
	}
}

// str adds name=v unless v is empty.
func (so *subOpts) str(name, v string) {
	if v == "" {
		return
	}
	if strings.Contains(v, ",") {
		so.fail(fmt.Errorf("%s=%q: a comma cannot be passed inside a sub-option value (swtpm has no escape for it); choose a name without one", name, v))
	}
	so.items = append(so.items, name+"="+v)
}

// fd adds name=fd for a given fd (> 0).
func (so *subOpts) fd(name string, fd int) {
	if fd > 0 {
		so.items = append(so.items, name+"="+strconv.Itoa(fd))
	}
}

func (so *subOpts) mode(name string, m uint32) {
	so.items = append(so.items, fmt.Sprintf("%s=%04o", name, m))
}

func (so *subOpts) flag(name string, set bool) {
	if set {
		so.items = append(so.items, name)
	}
}
