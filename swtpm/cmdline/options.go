package cmdline

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Channel types of --ctrl and --server.
const (
	TypeUnixIO = "unixio"
	TypeTCP    = "tcp"
)

// DefaultBindAddr is where TCP sockets listen when no bindaddr= is given (as swtpm).
const DefaultBindAddr = "127.0.0.1"

// Channel is a parsed --ctrl or --server option: where the control or data channel
// listens or which connection it already has.
//
// swtpm treats "fd=" differently per option and type; Parse resolves that quirk so that
// exactly one of Path, Port >= 0, ListenFD >= 0 or ConnFD >= 0 is set:
//   - --ctrl type=unixio,fd=N and --ctrl type=tcp,fd=N and --server type=unixio,fd=N:
//     N is a listening socket (ListenFD).
//   - --ctrl type=unixio,clientfd=N, --server type=tcp,fd=N (what swtpm_setup passes)
//     and the legacy -f N: N is an already connected stream (ConnFD).
type Channel struct {
	Type     string      // TypeUnixIO or TypeTCP
	Path     string      // unixio: socket file to create (an existing file is replaced)
	Port     int         // tcp: port to listen on; -1 when not given
	BindAddr string      // tcp: listen address, IPv4 or IPv6 (no host names, as swtpm); DefaultBindAddr when not given
	IfName   string      // tcp: interface of an IPv6 link-local bindaddr
	ListenFD int         // an inherited listening socket; -1 when not given
	ConnFD   int         // an inherited connected stream; -1 when not given
	Mode     os.FileMode // unixio path: mode of the socket file (default 0770)
	UID, GID string      // unixio path: owner of the socket file, number or name; "" keeps it

	// Terminate (--ctrl ...,terminate): exit when the control connection is lost.
	Terminate bool
	// Disconnect (--server ...,disconnect; legacy -p): close the data connection after
	// each response.
	Disconnect bool
}

// StateOptions is the parsed --tpmstate option.
type StateOptions struct {
	Dir string // state directory (dir= or backend-uri=dir://); "" with File
	// File is the linear state file, a regular file or a block device
	// (backend-uri=file://<path>, swtpm's linear backend); "" with Dir.
	File        string
	Mode        os.FileMode // mode of the state files; 0640 when not given
	ModeDefault bool        // Mode was not given (swtpm then keeps the mode of existing files)
	Lock        bool        // lock the directory; always true for the directory backend
	Backup      bool        // keep <file>.bak and fall back to it (state.Options.Backup)
	Fsync       bool        // accepted for compatibility; nkp always syncs
	// AcceptRollback (accept-rollback, nkp only): load the older record of a state file
	// whose newer slot is damaged, losing the newest write, instead of refusing it
	// (state.Options.AcceptRollback, state.ErrRollback). For one start, as the
	// operator's way out when no backup is at hand.
	AcceptRollback bool
}

// Key sources and formats of --key and --migration-key.
const (
	FormatHex    = "hex"
	FormatBinary = "binary"
	KDFPBKDF2    = "pbkdf2"
	KDFSHA512    = "sha512"
)

// KeyOptions is a parsed --key or --migration-key option. It holds where the key is,
// never the key itself: the state package reads and derives it.
type KeyOptions struct {
	File    string // file=: a key file
	FD      int    // fd=: a key on an inherited fd; -1 when not given
	PwdFile string // pwdfile=: a passphrase file
	PwdFD   int    // pwdfd=: a passphrase on an inherited fd; -1 when not given
	Mode    string // mode=: aes-128-cbc ("aes-cbc"), aes-256-cbc, aes-256-gcm; "" when not given
	KeyLen  int    // 16 or 32 as mode= implies; 0 when not given (the key's length decides)
	Format  string // format=: FormatHex (default) or FormatBinary, for file= and fd=
	KDF     string // kdf=: KDFPBKDF2 (default) or KDFSHA512, for pwdfile= and pwdfd=
	Remove  bool   // remove=: unlink file= or pwdfile= after reading it
}

// IsPassphrase reports whether the key is derived from a passphrase.
func (k *KeyOptions) IsPassphrase() bool { return k.PwdFile != "" || k.PwdFD >= 0 }

// LogOptions is the parsed --log option.
type LogOptions struct {
	File     string // file=: log file ("-" disables logging)
	FD       int    // fd=: an inherited fd; -1 when not given
	Level    uint   // level=: 0 when not given (1 is then used for a file or fd)
	Prefix   string // prefix=: text put before every line
	Truncate bool   // truncate: empty the file first instead of appending
}

// PidOptions is the parsed --pid option.
type PidOptions struct {
	File string // file=: written with the process id, removed at exit
	FD   int    // fd=: an inherited fd of a regular file; -1 when not given
}

// Startup types of --flags startup-*.
const (
	StartupNone        = "none"
	StartupClear       = "clear"
	StartupState       = "state"
	StartupDeactivated = "deactivated"
)

// FlagsOptions is the parsed --flags option.
type FlagsOptions struct {
	NotNeedInit         bool   // the TPM runs without CMD_INIT (implied by a Startup)
	Startup             string // "" or a Startup* constant: TPM2_Startup sent by nkp-swtpm itself
	DisableAutoShutdown bool   // no automatic TPM2_Shutdown before INIT, STOP or exit
}

// LocalityOptions is the parsed --locality option.
type LocalityOptions struct {
	RejectLocality4  bool // SET_LOCALITY(4) fails with BAD_LOCALITY
	AllowSetLocality bool // the TPM2_SetLocality vendor command (0x20001000) is served
}

// MigrationOptions is the parsed --migration option.
type MigrationOptions struct {
	Incoming            bool // defer locking the state until the state blobs arrive
	ReleaseLockOutgoing bool // release the state lock when the savestate blob is read
}

// Options is the parsed command line of `nkp-swtpm socket`.
type Options struct {
	TPM2              bool
	Ctrl              *Channel      // --ctrl; nil when not given
	Server            *Channel      // --server, -p or -f; nil: data only through SET_DATAFD
	State             *StateOptions // --tpmstate; nil when not given (TPM_PATH is then used)
	Key               *KeyOptions   // --key; nil: plaintext state
	MigrationKey      *KeyOptions   // --migration-key
	Log               *LogOptions   // --log; nil: log to stderr
	Pid               *PidOptions   // --pid
	Flags             FlagsOptions
	Locality          LocalityOptions
	Migration         MigrationOptions
	Seccomp           string // --seccomp action=: "none", "log" or "kill"; accepted, not enforced
	Terminate         bool   // -t/--terminate: exit when the data connection is lost
	Daemon            bool   // -d/--daemon
	RunAs             string // -r/--runas: user to switch to before opening files
	PrintCapabilities bool
	PrintStates       bool
	Help              bool
	Version           bool
}

// Sub-options accepted by each option, in swtpm's order.
var (
	ctrlSubOpts = []subOpt{{"type", kindString}, {"path", kindString}, {"port", kindInt},
		{"bindaddr", kindString}, {"ifname", kindString}, {"fd", kindInt}, {"clientfd", kindInt},
		{"mode", kindMode}, {"uid", kindOwner}, {"gid", kindOwner}, {"terminate", kindBool}}
	serverSubOpts = []subOpt{{"type", kindString}, {"path", kindString}, {"port", kindInt},
		{"bindaddr", kindString}, {"ifname", kindString}, {"fd", kindInt}, {"disconnect", kindBool},
		{"mode", kindMode}, {"uid", kindOwner}, {"gid", kindOwner}}
	stateSubOpts = []subOpt{{"dir", kindString}, {"mode", kindMode}, {"backend-uri", kindString},
		{"lock", kindBool}, {"backup", kindBool}, {"fsync", kindBool}, {"accept-rollback", kindBool}}
	keySubOpts = []subOpt{{"file", kindString}, {"mode", kindString}, {"format", kindString},
		{"remove", kindBool}, {"pwdfile", kindString}, {"kdf", kindString}, {"fd", kindInt},
		{"pwdfd", kindInt}}
	logSubOpts = []subOpt{{"file", kindString}, {"fd", kindInt}, {"level", kindUint},
		{"prefix", kindString}, {"truncate", kindBool}}
	pidSubOpts      = []subOpt{{"file", kindString}, {"fd", kindInt}}
	flagsSubOpts    = []subOpt{{"not-need-init", kindBool}, {"startup-none", kindBool}, {"startup-clear", kindBool}, {"startup-state", kindBool}, {"startup-deactivated", kindBool}, {"disable-auto-shutdown", kindBool}}
	localitySubOpts = []subOpt{{"reject-locality-4", kindBool}, {"allow-set-locality", kindBool}}
	migrateSubOpts  = []subOpt{{"incoming", kindBool}, {"release-lock-outgoing", kindBool}}
	seccompSubOpts  = []subOpt{{"action", kindString}}
)

// longOpt is one long option of `nkp-swtpm socket`.
type longOpt struct {
	name   string
	short  byte // 0 when there is none
	hasArg bool
	set    func(o *Options, val string) error
}

// unsupported lists swtpm options nkp-swtpm knows but does not implement, with why.
var unsupported = map[string]string{
	"chroot":         "nkp-swtpm does not chroot; run it in a mount namespace or container instead",
	"profile":        "TPM profiles need libtpms 0.10; nkp-swtpm runs libtpms' default TPM 2.0",
	"print-profiles": "TPM profiles need libtpms 0.10",
	"print-info":     "use swtpm_ioctl --info against a running nkp-swtpm",
	"pcap":           "packet capture is not implemented by nkp-swtpm",
}

var longOpts = []longOpt{
	{"tpm2", 0, false, func(o *Options, _ string) error { o.TPM2 = true; return nil }},
	{"ctrl", 0, true, func(o *Options, v string) (err error) { o.Ctrl, err = parseCtrl(v); return }},
	{"server", 0, true, func(o *Options, v string) (err error) {
		o.Server, err = parseServer(v)
		// swtpm ends when a data stream it was handed (fd=) closes.
		if err == nil && o.Server.ConnFD >= 0 {
			o.Terminate = true
		}
		return
	}},
	{"tpmstate", 0, true, func(o *Options, v string) (err error) { o.State, err = parseState(v); return }},
	{"key", 0, true, func(o *Options, v string) (err error) { o.Key, err = parseKey("key", v); return }},
	{"migration-key", 0, true, func(o *Options, v string) (err error) {
		o.MigrationKey, err = parseKey("migration-key", v)
		return
	}},
	{"log", 0, true, func(o *Options, v string) (err error) { o.Log, err = parseLog(v); return }},
	{"pid", 0, true, func(o *Options, v string) (err error) { o.Pid, err = parsePid(v); return }},
	{"flags", 0, true, func(o *Options, v string) (err error) { o.Flags, err = parseFlags(v); return }},
	{"locality", 0, true, func(o *Options, v string) (err error) { o.Locality, err = parseLocality(v); return }},
	{"migration", 0, true, func(o *Options, v string) (err error) { o.Migration, err = parseMigration(v); return }},
	{"seccomp", 0, true, func(o *Options, v string) (err error) { o.Seccomp, err = parseSeccomp(v); return }},
	{"terminate", 't', false, func(o *Options, _ string) error { o.Terminate = true; return nil }},
	{"daemon", 'd', false, func(o *Options, _ string) error { o.Daemon = true; return nil }},
	{"runas", 'r', true, func(o *Options, v string) error {
		if v == "" {
			return fmt.Errorf("--runas needs a user name or uid")
		}
		o.RunAs = v
		return nil
	}},
	{"port", 'p', true, func(o *Options, v string) error {
		port, err := parsePort("port", v)
		if err != nil {
			return err
		}
		// Exactly what --server type=tcp,port=<port>,disconnect gives.
		o.Server = &Channel{Type: TypeTCP, Port: port, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: -1, Mode: 0o770, Disconnect: true}
		return nil
	}},
	{"fd", 'f', true, func(o *Options, v string) error {
		fd, err := strconv.Atoi(v)
		if err != nil || fd < 0 {
			return fmt.Errorf("--fd %q: want the number of an inherited file descriptor", v)
		}
		if fd < 3 {
			return fmt.Errorf("--fd %d: file descriptors 0, 1 and 2 cannot carry the data channel", fd)
		}
		o.Server = &Channel{Type: TypeUnixIO, Port: -1, ListenFD: -1, ConnFD: fd}
		o.Terminate = true
		return nil
	}},
	{"print-capabilities", 0, false, func(o *Options, _ string) error { o.PrintCapabilities = true; return nil }},
	{"print-states", 0, false, func(o *Options, _ string) error { o.PrintStates = true; return nil }},
	{"help", 'h', false, func(o *Options, _ string) error { o.Help = true; return nil }},
	{"version", 0, false, func(o *Options, _ string) error { o.Version = true; return nil }},
}

// acceptedLong lists the long options for error messages.
func acceptedLong() string {
	s := make([]string, len(longOpts))
	for i, o := range longOpts {
		s[i] = "--" + o.name
	}
	return strings.Join(s, " ")
}

// findLong returns the long option called name, or the only one that name abbreviates
// (getopt_long's rule, which swtpm inherits).
func findLong(name string) (*longOpt, error) {
	var match *longOpt
	n := 0
	for i := range longOpts {
		if longOpts[i].name == name {
			return &longOpts[i], nil
		}
		if strings.HasPrefix(longOpts[i].name, name) {
			match = &longOpts[i]
			n++
		}
	}
	if why, ok := unsupported[name]; ok {
		return nil, fmt.Errorf("option --%s is not supported by nkp-swtpm: %s", name, why)
	}
	switch {
	case n == 1:
		return match, nil
	case n > 1:
		return nil, fmt.Errorf("option --%s is ambiguous; accepted options: %s", name, acceptedLong())
	}
	return nil, fmt.Errorf("unknown option --%s; accepted options: %s (see nkp-swtpm socket --help)", name, acceptedLong())
}

func findShort(c byte) (*longOpt, error) {
	for i := range longOpts {
		if longOpts[i].short == c {
			return &longOpts[i], nil
		}
	}
	if c == 'R' {
		return nil, fmt.Errorf("option -R (--chroot) is not supported by nkp-swtpm: %s", unsupported["chroot"])
	}
	return nil, fmt.Errorf("unknown option -%c; accepted short options: -d -h -p PORT -f FD -t -r USER (see nkp-swtpm socket --help)", c)
}

// Parse parses the arguments of `nkp-swtpm socket` (without the program name and the
// "socket" mode word) the way swtpm's getopt_long loop does: "--name value",
// "--name=value", unambiguous abbreviations of long names, and grouped short options
// ("-dt", "-p2321"). A later option replaces an earlier one of the same name. It does
// no I/O: files, fds and user names are checked when the options are used.
// It refuses unknown options and sub-options, values of the wrong type, contradictory
// sub-options and positional arguments, naming the offending option and what is accepted.
func Parse(args []string) (*Options, error) {
	o := &Options{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			if i+1 < len(args) {
				return nil, fmt.Errorf("unexpected argument %q: nkp-swtpm socket takes only options", args[i+1])
			}
			return o, validate(o)
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			opt, err := findLong(name)
			if err != nil {
				return nil, err
			}
			if opt.hasArg && !hasVal {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("option --%s needs a value (see nkp-swtpm socket --help)", opt.name)
				}
				i++
				val = args[i]
			} else if !opt.hasArg && hasVal {
				return nil, fmt.Errorf("option --%s takes no value (got %q)", opt.name, val)
			}
			if err := opt.set(o, val); err != nil {
				return nil, err
			}
		case strings.HasPrefix(a, "-") && len(a) > 1:
			for j := 1; j < len(a); j++ {
				opt, err := findShort(a[j])
				if err != nil {
					return nil, err
				}
				if !opt.hasArg {
					if err := opt.set(o, ""); err != nil {
						return nil, err
					}
					continue
				}
				val := a[j+1:]
				if val == "" {
					if i+1 >= len(args) {
						return nil, fmt.Errorf("option -%c needs a value (see nkp-swtpm socket --help)", opt.short)
					}
					i++
					val = args[i]
				}
				if err := opt.set(o, val); err != nil {
					return nil, err
				}
				break
			}
		default:
			return nil, fmt.Errorf("unexpected argument %q: nkp-swtpm socket takes only options (see nkp-swtpm socket --help)", a)
		}
	}
	return o, validate(o)
}

// validate checks what no single option can: the combination.
func validate(o *Options) error {
	if o.Help || o.Version || o.PrintCapabilities {
		return nil
	}
	if !o.TPM2 {
		return fmt.Errorf("nkp-swtpm emulates a TPM 2.0 only and TPM 1.2 is not available: add --tpm2")
	}
	if o.PrintStates {
		return nil
	}
	if o.Server != nil && o.Server.ConnFD >= 0 && o.Ctrl != nil && o.Ctrl.ConnFD == o.Server.ConnFD {
		return fmt.Errorf("--ctrl and --server cannot share file descriptor %d", o.Server.ConnFD)
	}
	return nil
}

func parsePort(option, v string) (int, error) {
	p, err := strconv.ParseUint(v, 0, 32)
	if err != nil || p > 65535 {
		return 0, fmt.Errorf("--%s: port %q is not a number between 0 and 65535", option, v)
	}
	return int(p), nil
}

func fdValue(option string, vs subValues, name string) (int, error) {
	fd := int(vs.num(name, -1))
	if vs.has(name) && fd < 3 {
		return -1, fmt.Errorf("--%s: %s=%d: file descriptors 0, 1 and 2 are not accepted (want an inherited fd >= 3)", option, name, fd)
	}
	return fd, nil
}

// countSet returns how many of names were given.
func countSet(vs subValues, names ...string) int {
	n := 0
	for _, name := range names {
		if vs.has(name) {
			n++
		}
	}
	return n
}

func parseChannel(option string, vs subValues, defType string) (*Channel, error) {
	c := &Channel{
		Type:     vs.str("type", defType),
		Path:     vs.str("path", ""),
		Port:     int(vs.num("port", -1)),
		BindAddr: vs.str("bindaddr", DefaultBindAddr),
		IfName:   vs.str("ifname", ""),
		ListenFD: -1,
		ConnFD:   -1,
		Mode:     os.FileMode(vs.num("mode", 0o770)),
		UID:      vs.str("uid", ""),
		GID:      vs.str("gid", ""),
	}
	fd, err := fdValue(option, vs, "fd")
	if err != nil {
		return nil, err
	}
	clientfd, err := fdValue(option, vs, "clientfd")
	if err != nil {
		return nil, err
	}
	switch c.Type {
	case TypeUnixIO:
		if n := countSet(vs, "path", "fd", "clientfd"); n != 1 {
			return nil, fmt.Errorf("--%s type=unixio needs exactly one of path=, fd= or clientfd= (got %d)", option, n)
		}
		for _, name := range []string{"port", "bindaddr", "ifname"} {
			if vs.has(name) {
				return nil, fmt.Errorf("--%s: %s= applies to type=tcp only", option, name)
			}
		}
		if c.Path == "" && countSet(vs, "mode", "uid", "gid") > 0 {
			return nil, fmt.Errorf("--%s: mode=, uid= and gid= apply to a socket created at path= only", option)
		}
		c.ListenFD, c.ConnFD = fd, clientfd
	case TypeTCP:
		if n := countSet(vs, "port", "fd"); n != 1 {
			return nil, fmt.Errorf("--%s type=tcp needs exactly one of port= or fd= (got %d)", option, n)
		}
		for _, name := range []string{"path", "clientfd", "mode", "uid", "gid"} {
			if vs.has(name) {
				return nil, fmt.Errorf("--%s: %s= applies to type=unixio only", option, name)
			}
		}
		if vs.has("port") {
			if c.Port < 0 || c.Port > 65535 {
				return nil, fmt.Errorf("--%s: port=%d is outside 0..65535", option, c.Port)
			}
		}
		c.ListenFD = fd
	default:
		return nil, fmt.Errorf("--%s: unsupported type=%q; accepted types: unixio, tcp", option, c.Type)
	}
	return c, nil
}

func parseCtrl(v string) (*Channel, error) {
	vs, err := parseSubOptions("ctrl", v, ctrlSubOpts)
	if err != nil {
		return nil, err
	}
	if !vs.has("type") {
		return nil, fmt.Errorf("--ctrl needs type=unixio or type=tcp")
	}
	c, err := parseChannel("ctrl", vs, "")
	if err != nil {
		return nil, err
	}
	c.Terminate = vs.flag("terminate")
	return c, nil
}

func parseServer(v string) (*Channel, error) {
	vs, err := parseSubOptions("server", v, serverSubOpts)
	if err != nil {
		return nil, err
	}
	c, err := parseChannel("server", vs, TypeTCP)
	if err != nil {
		return nil, err
	}
	// swtpm reads from --server type=tcp,fd=N directly: it is a connected stream.
	if c.Type == TypeTCP && c.ListenFD >= 0 {
		c.ConnFD, c.ListenFD = c.ListenFD, -1
	}
	c.Disconnect = vs.flag("disconnect")
	return c, nil
}

func parseState(v string) (*StateOptions, error) {
	vs, err := parseSubOptions("tpmstate", v, stateSubOpts)
	if err != nil {
		return nil, err
	}
	s := &StateOptions{
		Mode:        os.FileMode(vs.num("mode", 0o640)),
		ModeDefault: !vs.has("mode"),
		Lock:        true,
		Backup:      vs.flag("backup"),
		Fsync:       vs.flag("fsync"),

		AcceptRollback: vs.flag("accept-rollback"),
	}
	if l, ok := vs.get("lock"); ok && !l.flag {
		return nil, fmt.Errorf("--tpmstate lock=false: nkp-swtpm always locks its state against a second process")
	}
	switch n := countSet(vs, "dir", "backend-uri"); {
	case n == 0:
		return nil, fmt.Errorf("--tpmstate needs dir=<directory> or backend-uri=dir://<directory>")
	case n > 1:
		return nil, fmt.Errorf("--tpmstate takes dir= or backend-uri=, not both")
	}
	if vs.has("dir") {
		s.Dir = vs.str("dir", "")
		return s, nil
	}
	uri := vs.str("backend-uri", "")
	scheme, rest, ok := strings.Cut(uri, "://")
	switch {
	case ok && scheme == "dir" && rest != "":
		s.Dir = rest
	case ok && scheme == "file" && rest != "":
		if s.Backup {
			return nil, fmt.Errorf("--tpmstate backend-uri=%s,backup: backup is an option of the directory backend; the linear file keeps its previous blob until the new one is written", uri)
		}
		if s.AcceptRollback {
			return nil, fmt.Errorf("--tpmstate backend-uri=%s,accept-rollback: the linear file has no slots to roll back to; accept-rollback is an option of the directory backend", uri)
		}
		s.File = rest
	default:
		return nil, fmt.Errorf("--tpmstate backend-uri=%q: want dir://<directory> or file://<file or block device>", uri)
	}
	return s, nil
}

func parseKey(option, v string) (*KeyOptions, error) {
	vs, err := parseSubOptions(option, v, keySubOpts)
	if err != nil {
		return nil, err
	}
	k := &KeyOptions{
		File:    vs.str("file", ""),
		PwdFile: vs.str("pwdfile", ""),
		Remove:  vs.flag("remove"),
	}
	if k.FD, err = fdValue(option, vs, "fd"); err != nil {
		return nil, err
	}
	if k.PwdFD, err = fdValue(option, vs, "pwdfd"); err != nil {
		return nil, err
	}
	if n := countSet(vs, "file", "fd", "pwdfile", "pwdfd"); n != 1 {
		return nil, fmt.Errorf("--%s needs exactly one of file=, fd=, pwdfile= or pwdfd= (got %d)", option, n)
	}
	switch k.Mode = vs.str("mode", ""); k.Mode {
	case "":
		// swtpm's default is aes-128-cbc; nkp decides by the key's length instead, so
		// that a 256-bit key file works without mode= (a passphrase gives 128 bits).
	case "aes-cbc", "aes-128-cbc":
		k.Mode, k.KeyLen = "aes-128-cbc", 16
	case "aes-256-cbc", "aes-256-gcm":
		k.KeyLen = 32
	default:
		return nil, fmt.Errorf("--%s: unsupported mode=%q; accepted modes: aes-128-cbc (aes-cbc), aes-256-cbc, aes-256-gcm (nkp only)", option, k.Mode)
	}
	if k.IsPassphrase() {
		if vs.has("format") {
			return nil, fmt.Errorf("--%s: format= applies to file= and fd= keys, not to a passphrase", option)
		}
		switch k.KDF = vs.str("kdf", KDFPBKDF2); k.KDF {
		case KDFPBKDF2, KDFSHA512:
		default:
			return nil, fmt.Errorf("--%s: unsupported kdf=%q; accepted: pbkdf2, sha512", option, k.KDF)
		}
	} else {
		if vs.has("kdf") {
			return nil, fmt.Errorf("--%s: kdf= applies to pwdfile= and pwdfd= passphrases, not to a key", option)
		}
		switch k.Format = vs.str("format", FormatHex); k.Format {
		case FormatHex, FormatBinary:
		default:
			return nil, fmt.Errorf("--%s: unsupported format=%q; accepted: hex, binary", option, k.Format)
		}
	}
	return k, nil
}

func parseLog(v string) (*LogOptions, error) {
	vs, err := parseSubOptions("log", v, logSubOpts)
	if err != nil {
		return nil, err
	}
	l := &LogOptions{
		File:     vs.str("file", ""),
		Level:    uint(vs.num("level", 0)),
		Prefix:   vs.str("prefix", ""),
		Truncate: vs.flag("truncate"),
	}
	if l.FD, err = fdValue("log", vs, "fd"); err != nil {
		// swtpm accepts fd=1 and fd=2 for logging to stdout or stderr.
		if fd := vs.num("fd", -1); fd == 1 || fd == 2 {
			l.FD = int(fd)
		} else {
			return nil, err
		}
	}
	if countSet(vs, "file", "fd") > 1 {
		return nil, fmt.Errorf("--log takes file= or fd=, not both")
	}
	return l, nil
}

func parsePid(v string) (*PidOptions, error) {
	vs, err := parseSubOptions("pid", v, pidSubOpts)
	if err != nil {
		return nil, err
	}
	p := &PidOptions{File: vs.str("file", "")}
	if p.FD, err = fdValue("pid", vs, "fd"); err != nil {
		return nil, err
	}
	if n := countSet(vs, "file", "fd"); n != 1 {
		return nil, fmt.Errorf("--pid needs exactly one of file= or fd=")
	}
	return p, nil
}

func parseFlags(v string) (FlagsOptions, error) {
	vs, err := parseSubOptions("flags", v, flagsSubOpts)
	if err != nil {
		return FlagsOptions{}, err
	}
	f := FlagsOptions{NotNeedInit: vs.flag("not-need-init"), DisableAutoShutdown: vs.flag("disable-auto-shutdown")}
	for _, st := range []string{StartupNone, StartupClear, StartupState, StartupDeactivated} {
		if !vs.flag("startup-" + st) {
			continue
		}
		if f.Startup != "" {
			return FlagsOptions{}, fmt.Errorf("--flags: startup-%s and startup-%s exclude each other", f.Startup, st)
		}
		f.Startup = st
	}
	if f.Startup != "" && f.Startup != StartupNone {
		f.NotNeedInit = true
	}
	return f, nil
}

func parseLocality(v string) (LocalityOptions, error) {
	vs, err := parseSubOptions("locality", v, localitySubOpts)
	if err != nil {
		return LocalityOptions{}, err
	}
	return LocalityOptions{RejectLocality4: vs.flag("reject-locality-4"), AllowSetLocality: vs.flag("allow-set-locality")}, nil
}

func parseMigration(v string) (MigrationOptions, error) {
	vs, err := parseSubOptions("migration", v, migrateSubOpts)
	if err != nil {
		return MigrationOptions{}, err
	}
	return MigrationOptions{Incoming: vs.flag("incoming"), ReleaseLockOutgoing: vs.flag("release-lock-outgoing")}, nil
}

func parseSeccomp(v string) (string, error) {
	vs, err := parseSubOptions("seccomp", v, seccompSubOpts)
	if err != nil {
		return "", err
	}
	switch a := vs.str("action", "kill"); a {
	case "none", "log", "kill":
		return a, nil
	default:
		return "", fmt.Errorf("--seccomp: unsupported action=%q; accepted: none, log, kill", a)
	}
}
