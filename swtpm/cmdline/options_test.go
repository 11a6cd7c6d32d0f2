package cmdline

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
)

func unixCtrl(path string, mode os.FileMode) *Channel {
	return &Channel{Type: TypeUnixIO, Path: path, Port: -1, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: -1, Mode: mode}
}

func TestParseCommandLines(t *testing.T) {
	tests := []struct {
		name string
		args string
		want func(o *Options)
	}{
		{
			// specs/swtpm-protocol.md §3.1: what libvirt 9.0 runs.
			name: "libvirt emulator backend",
			args: "--ctrl type=unixio,path=/run/libvirt/qemu/swtpm/1-vm-swtpm.sock,mode=0600 --tpmstate dir=/var/lib/libvirt/swtpm/u/tpm2,mode=0600 --log file=/var/log/swtpm/libvirt/qemu/vm-swtpm.log --terminate --tpm2",
			want: func(o *Options) {
				o.TPM2, o.Terminate = true, true
				o.Ctrl = unixCtrl("/run/libvirt/qemu/swtpm/1-vm-swtpm.sock", 0o600)
				o.State = &StateOptions{Dir: "/var/lib/libvirt/swtpm/u/tpm2", Mode: 0o600, Lock: true}
				o.Log = &LogOptions{File: "/var/log/swtpm/libvirt/qemu/vm-swtpm.log", FD: -1}
			},
		},
		{
			name: "libvirt with encryption and migration",
			args: "--ctrl type=unixio,path=/s,mode=0600 --tpmstate dir=/d,mode=0600 --tpm2 --key pwdfd=20,mode=aes-256-cbc --migration-key pwdfd=21,mode=aes-256-cbc --migration release-lock-outgoing,incoming",
			want: func(o *Options) {
				o.TPM2 = true
				o.Ctrl = unixCtrl("/s", 0o600)
				o.State = &StateOptions{Dir: "/d", Mode: 0o600, Lock: true}
				o.Key = &KeyOptions{FD: -1, PwdFD: 20, Mode: "aes-256-cbc", KeyLen: 32, KDF: KDFPBKDF2}
				o.MigrationKey = &KeyOptions{FD: -1, PwdFD: 21, Mode: "aes-256-cbc", KeyLen: 32, KDF: KDFPBKDF2}
				o.Migration = MigrationOptions{Incoming: true, ReleaseLockOutgoing: true}
			},
		},
		{
			// specs/swtpm-protocol.md §3.2: what swtpm_setup runs.
			name: "swtpm_setup",
			args: "--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///tmp/st,lock --pid file=/tmp/p --tpm2 --key pwdfd=7,mode=aes-256-cbc --log file=/tmp/l --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6",
			want: func(o *Options) {
				o.TPM2, o.Terminate = true, true
				o.Flags = FlagsOptions{NotNeedInit: true, Startup: StartupClear}
				o.State = &StateOptions{Dir: "/tmp/st", Mode: 0o640, ModeDefault: true, Lock: true}
				o.Pid = &PidOptions{File: "/tmp/p", FD: -1}
				o.Key = &KeyOptions{FD: -1, PwdFD: 7, Mode: "aes-256-cbc", KeyLen: 32, KDF: KDFPBKDF2}
				o.Log = &LogOptions{File: "/tmp/l", FD: -1}
				o.Server = &Channel{Type: TypeTCP, Port: -1, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: 5, Mode: 0o770}
				o.Ctrl = &Channel{Type: TypeUnixIO, Port: -1, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: 6, Mode: 0o770}
			},
		},
		{
			name: "print states as swtpm_setup probes",
			args: "--print-states --tpmstate backend-uri=dir:///x --tpm2",
			want: func(o *Options) {
				o.TPM2, o.PrintStates = true, true
				o.State = &StateOptions{Dir: "/x", Mode: 0o640, ModeDefault: true, Lock: true}
			},
		},
		{
			name: "linear file backend",
			args: "--tpmstate backend-uri=file:///var/lib/tpm.img,mode=0600,lock --tpm2",
			want: func(o *Options) {
				o.TPM2 = true
				o.State = &StateOptions{File: "/var/lib/tpm.img", Mode: 0o600, Lock: true}
			},
		},
		{
			name: "print capabilities needs no --tpm2",
			args: "--print-capabilities",
			want: func(o *Options) { o.PrintCapabilities = true },
		},
		{
			name: "tcp channels, equals form, abbreviations, grouped short options",
			args: "--tpm2 --ctrl=type=tcp,port=2322,bindaddr=::1 --server type=tcp,port=2321,disconnect --tpmst dir=/s -dt -rtss --key file=/k,format=binary,remove --flags startup-state,disable-auto-shutdown --locality reject-locality-4,allow-set-locality --seccomp action=none --pid fd=9 --log fd=2,level=20,prefix=X:,truncate",
			want: func(o *Options) {
				o.TPM2, o.Daemon, o.Terminate, o.RunAs = true, true, true, "tss"
				o.Ctrl = &Channel{Type: TypeTCP, Port: 2322, BindAddr: "::1", ListenFD: -1, ConnFD: -1, Mode: 0o770}
				o.Server = &Channel{Type: TypeTCP, Port: 2321, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: -1, Mode: 0o770, Disconnect: true}
				o.State = &StateOptions{Dir: "/s", Mode: 0o640, ModeDefault: true, Lock: true}
				o.Key = &KeyOptions{File: "/k", FD: -1, PwdFD: -1, Format: FormatBinary, Remove: true}
				o.Flags = FlagsOptions{NotNeedInit: true, Startup: StartupState, DisableAutoShutdown: true}
				o.Locality = LocalityOptions{RejectLocality4: true, AllowSetLocality: true}
				o.Seccomp = "none"
				o.Pid = &PidOptions{FD: 9}
				o.Log = &LogOptions{FD: 2, Level: 20, Prefix: "X:", Truncate: true}
			},
		},
		{
			name: "legacy -p and unixio server, ctrl terminate, listening fds",
			args: "--tpm2 -p 2321 --ctrl type=unixio,fd=4,terminate --tpmstate dir=/s",
			want: func(o *Options) {
				o.TPM2 = true
				o.Server = &Channel{Type: TypeTCP, Port: 2321, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: -1, Mode: 0o770, Disconnect: true}
				o.Ctrl = &Channel{Type: TypeUnixIO, Port: -1, BindAddr: DefaultBindAddr, ListenFD: 4, ConnFD: -1, Mode: 0o770, Terminate: true}
				o.State = &StateOptions{Dir: "/s", Mode: 0o640, ModeDefault: true, Lock: true}
			},
		},
		{
			name: "accept-rollback",
			args: "--tpm2 --ctrl type=unixio,path=/c --tpmstate dir=/s,accept-rollback",
			want: func(o *Options) {
				o.TPM2 = true
				o.Ctrl = &Channel{Type: TypeUnixIO, Path: "/c", Port: -1, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: -1, Mode: 0o770}
				o.State = &StateOptions{Dir: "/s", Mode: 0o640, ModeDefault: true, Lock: true, AcceptRollback: true}
			},
		},
		{
			name: "unixio server at a path with owner",
			args: "--tpm2 --server type=unixio,path=/d.sock,mode=0660,uid=0,gid=kvm --tpmstate dir=/s --key fd=3,format=hex,mode=aes-cbc",
			want: func(o *Options) {
				o.TPM2 = true
				o.Server = &Channel{Type: TypeUnixIO, Path: "/d.sock", Port: -1, BindAddr: DefaultBindAddr, ListenFD: -1, ConnFD: -1, Mode: 0o660, UID: "0", GID: "kvm"}
				o.State = &StateOptions{Dir: "/s", Mode: 0o640, ModeDefault: true, Lock: true}
				o.Key = &KeyOptions{FD: 3, PwdFD: -1, Mode: "aes-128-cbc", KeyLen: 16, Format: FormatHex}
			},
		},
		{
			name: "help and version",
			args: "-h --version",
			want: func(o *Options) { o.Help, o.Version = true, true },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(strings.Fields(tt.args))
			if err != nil {
				t.Fatalf("Parse(%s): %v", tt.args, err)
			}
			want := &Options{}
			tt.want(want)
			if !reflect.DeepEqual(got, want) {
				gj, _ := json.MarshalIndent(got, "", " ")
				wj, _ := json.MarshalIndent(want, "", " ")
				t.Fatalf("Parse(%s)\n got %s\nwant %s", tt.args, gj, wj)
			}
		})
	}
}

func TestParseRefusals(t *testing.T) {
	tests := []struct {
		args    string
		wantErr []string // all must appear in the error
	}{
		{"--ctrl type=unixio,path=/s --tpmstate dir=/d", []string{"TPM 2.0 only", "--tpm2"}},
		{"--tpm2 --bogus", []string{"unknown option --bogus", "--ctrl"}},
		{"--tpm2 -x", []string{"unknown option -x"}},
		{"--tpm2 extra", []string{`unexpected argument "extra"`}},
		{"--tpm2 --ctrl type=unixio,path=/s,colour=red", []string{`--ctrl: unknown sub-option "colour"`, "path, port"}},
		{"--tpm2 --ctrl path=/s", []string{"--ctrl needs type="}},
		{"--tpm2 --ctrl type=udp,port=1", []string{`unsupported type="udp"`, "unixio, tcp"}},
		{"--tpm2 --ctrl type=unixio,path=/s,fd=4", []string{"exactly one of path=, fd= or clientfd="}},
		{"--tpm2 --ctrl type=unixio", []string{"exactly one of path=, fd= or clientfd="}},
		{"--tpm2 --ctrl type=tcp,clientfd=4,port=1", []string{"clientfd= applies to type=unixio only"}},
		{"--tpm2 --ctrl type=tcp,port=70000", []string{"port=70000 is outside"}},
		{"--tpm2 --ctrl type=tcp,port=x", []string{`port="x" is not a decimal integer`}},
		{"--tpm2 --ctrl type=unixio,path=/s,mode=0888", []string{"octal file mode"}},
		{"--tpm2 --ctrl type=unixio,path=/s,mode=01777", []string{"octal file mode"}},
		{"--tpm2 --ctrl type=unixio,fd=1", []string{"0, 1 and 2 are not accepted"}},
		{"--tpm2 --ctrl type=unixio,path=/s,terminate=maybe", []string{"true, false, 1 or 0"}},
		{"--tpm2 --ctrl type=unixio,path=/s,,terminate", []string{"empty sub-option"}},
		{"--tpm2 --ctrl type=unixio,path=/a,path=/b", []string{`"path" given twice`}},
		{"--tpm2 --ctrl", []string{"--ctrl needs a value"}},
		{"--tpm2 --ctrl=", []string{"--ctrl needs a value"}},
		{"--tpm2 --tpm2=yes", []string{"--tpm2 takes no value"}},
		{"--tpm2 --tpmstate backend-uri=file://", []string{"want dir://<directory> or file://"}},
		{"--tpm2 --tpmstate backend-uri=file:///var/lib/tpm.img,backup", []string{"backup is an option of the directory backend"}},
		{"--tpm2 --tpmstate backend-uri=file:///var/lib/tpm.img,accept-rollback", []string{"no slots"}},
		{"--tpm2 --tpmstate backend-uri=nfs://x", []string{"want dir://"}},
		{"--tpm2 --tpmstate mode=0600", []string{"needs dir="}},
		{"--tpm2 --tpmstate dir=/a,backend-uri=dir:///b", []string{"not both"}},
		{"--tpm2 --tpmstate dir=/a,lock=false", []string{"always locks"}},
		{"--tpm2 --key mode=aes-256-cbc", []string{"exactly one of file=, fd=, pwdfile= or pwdfd="}},
		{"--tpm2 --key file=/k,pwdfd=4", []string{"exactly one of"}},
		{"--tpm2 --key file=/k,mode=aes-512-gcm", []string{`unsupported mode="aes-512-gcm"`}},
		{"--tpm2 --key file=/k,kdf=sha512", []string{"kdf= applies to pwdfile="}},
		{"--tpm2 --key pwdfile=/k,format=binary", []string{"format= applies to file="}},
		{"--tpm2 --key pwdfile=/k,kdf=scrypt", []string{`unsupported kdf="scrypt"`}},
		{"--tpm2 --key file=/k,format=base64", []string{`unsupported format="base64"`}},
		{"--tpm2 --migration-key fd=2", []string{"--migration-key: fd=2"}},
		{"--tpm2 --flags startup-clear,startup-state", []string{"exclude each other"}},
		{"--tpm2 --flags not-need-init,reboot", []string{`unknown sub-option "reboot"`}},
		{"--tpm2 --locality reject-locality-3", []string{`unknown sub-option "reject-locality-3"`}},
		{"--tpm2 --migration outgoing", []string{`unknown sub-option "outgoing"`}},
		{"--tpm2 --seccomp action=trap", []string{`unsupported action="trap"`}},
		{"--tpm2 --pid mode=1", []string{`unknown sub-option "mode"`}},
		{"--tpm2 --pid file=/a,fd=4", []string{"exactly one of file= or fd="}},
		{"--tpm2 --log file=/a,fd=4", []string{"not both"}},
		{"--tpm2 --log file=/a,level=-1", []string{"unsigned decimal"}},
		{"--tpm2 --profile name=default", []string{"--profile is not supported"}},
		{"--tpm2 -R /chroot", []string{"-R (--chroot) is not supported"}},
		{"--tpm2 -p 65536", []string{"port \"65536\""}},
		{"--tpm2 -f 1", []string{"0, 1 and 2 cannot carry"}},
		{"--tpm2 --p 1", []string{"ambiguous"}},
		{"--tpm2 --runas", []string{"--runas needs a value"}},
		{"--tpm2 -r", []string{"-r needs a value"}},
	}
	for _, tt := range tests {
		t.Run(tt.args, func(t *testing.T) {
			_, err := Parse(strings.Fields(tt.args))
			if err == nil {
				t.Fatalf("Parse(%s) succeeded, want an error containing %q", tt.args, tt.wantErr)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Parse(%s) = %q, want it to contain %q", tt.args, err, w)
				}
			}
		})
	}
}
