package cmdline

import (
	"encoding/json"
	"os/exec"
	"reflect"
	"strings"
	"testing"
)

// TestBuildRoundTrip: for command lines that swtpm's users run, Build(Parse(args))
// parses back to the same Options.
func TestBuildRoundTrip(t *testing.T) {
	for _, args := range []string{
		// libvirt 9.0 (specs/swtpm-protocol.md §3.1), with encryption and migration.
		"--ctrl type=unixio,path=/run/libvirt/qemu/swtpm/1-vm-swtpm.sock,mode=0600 --tpmstate dir=/var/lib/libvirt/swtpm/u/tpm2,mode=0600 --log file=/var/log/swtpm/vm.log --terminate --tpm2",
		"--ctrl type=unixio,path=/s,mode=0600 --tpmstate dir=/d,mode=0600 --tpm2 --key pwdfd=20,mode=aes-256-cbc --migration-key pwdfd=21,mode=aes-256-cbc --migration release-lock-outgoing,incoming",
		// swtpm_setup (§3.2).
		"--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///tmp/st,lock --pid file=/tmp/p --tpm2 --key pwdfd=7,mode=aes-256-cbc --log file=/tmp/l --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6",
		// what hostd runs.
		"--tpm2 --ctrl type=unixio,path=/run/nkp/vtpm/u.sock,mode=0660,gid=kvm --tpmstate dir=/var/lib/nkp/vtpm/u,mode=0600 --key fd=3,format=binary,mode=aes-256-gcm --log fd=2,level=2 --seccomp action=kill",
		"--tpm2 --ctrl=type=tcp,port=2322,bindaddr=::1,ifname=eth0 --server type=tcp,port=2321,disconnect --tpmst dir=/s,backup,fsync,accept-rollback -dt -rtss --key file=/k,format=binary,remove --flags startup-state,disable-auto-shutdown --locality reject-locality-4,allow-set-locality --seccomp action=none --pid fd=9 --log fd=9,level=20,prefix=X:,truncate",
		"--tpm2 -p 2321 --ctrl type=unixio,fd=4,terminate --tpmstate dir=/s",
		"--tpm2 -f 7 --ctrl type=tcp,fd=4 --tpmstate dir=/s --key pwdfile=/p,kdf=sha512,remove --flags startup-none",
		"--tpm2 --server type=unixio,path=/d.sock,mode=0660,uid=0,gid=kvm --tpmstate dir=/s --key fd=3,format=hex,mode=aes-cbc --migration-key file=/m",
		"--tpm2 --server type=unixio,fd=8,disconnect --ctrl type=unixio,path=/c --tpmstate dir=/s --log file=-",
		"--print-states --tpmstate backend-uri=dir:///x --tpm2",
		"--tpmstate backend-uri=file:///dev/vg0/tpm,mode=0600 --tpm2 --ctrl type=unixio,path=/s",
		"--print-capabilities",
		"-h --version",
	} {
		t.Run(args, func(t *testing.T) {
			want, err := Parse(strings.Fields(args))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			built, err := Build(want)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			got, err := Parse(built)
			if err != nil {
				t.Fatalf("Parse(Build) %q: %v", built, err)
			}
			if !reflect.DeepEqual(got, want) {
				gj, _ := json.Marshal(got)
				wj, _ := json.Marshal(want)
				t.Fatalf("Build gave %q, which parses to\n %s\nwant\n %s", built, gj, wj)
			}
		})
	}
}

// TestBuildLiterals: Options written by hand, with only the fields a caller uses,
// give the expected argv.
func TestBuildLiterals(t *testing.T) {
	tests := []struct {
		name string
		o    Options
		want string
	}{
		{
			name: "hostd's vTPM",
			o: Options{
				TPM2:    true,
				Ctrl:    &Channel{Type: TypeUnixIO, Path: "/run/nkp/vtpm/u.sock", Mode: 0o660, GID: "kvm", Terminate: true},
				State:   &StateOptions{Dir: "/var/lib/nkp/vtpm/u", Mode: 0o600},
				Key:     &KeyOptions{FD: 3, Format: FormatBinary, Mode: "aes-256-gcm"},
				Log:     &LogOptions{FD: 2},
				Flags:   FlagsOptions{Startup: StartupClear},
				Seccomp: "kill",
			},
			want: "--tpm2 --ctrl type=unixio,path=/run/nkp/vtpm/u.sock,mode=0660,gid=kvm,terminate --tpmstate dir=/var/lib/nkp/vtpm/u,mode=0600 --key fd=3,mode=aes-256-gcm,format=binary --log fd=2 --flags startup-clear --seccomp action=kill",
		},
		{
			name: "passphrase on an fd, data on a connected stream",
			o: Options{
				TPM2:   true,
				Ctrl:   &Channel{Type: TypeUnixIO, ConnFD: 6},
				Server: &Channel{Type: TypeUnixIO, ConnFD: 5},
				State:  &StateOptions{Dir: "/d"},
				Key:    &KeyOptions{PwdFD: 7, KDF: KDFSHA512},
			},
			want: "--tpm2 --ctrl type=unixio,clientfd=6 --fd 5 --tpmstate dir=/d --key pwdfd=7,kdf=sha512",
		},
		{
			name: "tcp, default server type",
			o: Options{
				TPM2:      true,
				Ctrl:      &Channel{Type: TypeTCP, Port: 2322, BindAddr: "::1"},
				Server:    &Channel{Port: 2321, Disconnect: true},
				State:     &StateOptions{Dir: "/d", Backup: true},
				Terminate: true,
				RunAs:     "tss",
			},
			want: "--tpm2 --ctrl type=tcp,port=2322,bindaddr=::1 --server port=2321,disconnect --tpmstate dir=/d,backup --terminate --runas tss",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Build(&tt.o)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			if strings.Join(got, " ") != tt.want {
				t.Errorf("Build =\n %s\nwant\n %s", strings.Join(got, " "), tt.want)
			}
		})
	}
}

// TestBuildRefusals: what no command line can say, and what Parse would refuse, fail
// in Build with an error that names the option and the reason.
func TestBuildRefusals(t *testing.T) {
	tests := []struct {
		name    string
		o       *Options
		wantErr []string
	}{
		{"nil", nil, []string{"no options"}},
		{"no --tpm2", &Options{State: &StateOptions{Dir: "/d"}}, []string{"add --tpm2"}},
		{"comma in a path", &Options{TPM2: true, State: &StateOptions{Dir: "/a,b"}}, []string{"--tpmstate", `dir="/a,b"`, "comma"}},
		{"comma in a log prefix", &Options{TPM2: true, Log: &LogOptions{File: "/l", Prefix: "a,b"}}, []string{"--log", "prefix="}},
		{"ctrl without type", &Options{TPM2: true, Ctrl: &Channel{Path: "/s"}}, []string{"--ctrl: needs a Type", "TypeUnixIO"}},
		{"unknown type", &Options{TPM2: true, Ctrl: &Channel{Type: "udp", Port: 1}}, []string{`unsupported type="udp"`}},
		{"unixio ctrl with nothing", &Options{TPM2: true, Ctrl: &Channel{Type: TypeUnixIO}}, []string{"exactly one of path=, fd= or clientfd="}},
		{"unixio with path and fd", &Options{TPM2: true, Ctrl: &Channel{Type: TypeUnixIO, Path: "/s", ListenFD: 4}}, []string{"exactly one of path=, fd= or clientfd="}},
		{"tcp ctrl on a connected stream", &Options{TPM2: true, Ctrl: &Channel{Type: TypeTCP, ConnFD: 5}}, []string{"--ctrl", "ConnFD 5", "clientfd="}},
		{"tcp server on a listening socket", &Options{TPM2: true, Server: &Channel{Type: TypeTCP, ListenFD: 5}}, []string{"--server", "ListenFD 5"}},
		{"unixio server stream with disconnect", &Options{TPM2: true, Server: &Channel{Type: TypeUnixIO, ConnFD: 5, Disconnect: true}}, []string{"--server", "--fd 5"}},
		{"terminate on server", &Options{TPM2: true, Server: &Channel{Type: TypeTCP, Port: 1, Terminate: true}}, []string{`--server: unknown sub-option "terminate"`}},
		{"socket mode too wide", &Options{TPM2: true, Ctrl: &Channel{Type: TypeUnixIO, Path: "/s", Mode: 0o4755}}, []string{"octal file mode"}},
		{"stdin as key fd", &Options{TPM2: true, Key: &KeyOptions{FD: 1}}, []string{"--key: fd=1", "0, 1 and 2"}},
		{"key from two places", &Options{TPM2: true, Key: &KeyOptions{File: "/k", FD: 3}}, []string{"exactly one of file=, fd=, pwdfile= or pwdfd="}},
		{"key without source", &Options{TPM2: true, Key: &KeyOptions{Mode: "aes-256-gcm"}}, []string{"exactly one of"}},
		{"unknown key mode", &Options{TPM2: true, Key: &KeyOptions{FD: 3, Mode: "aes-512"}}, []string{`unsupported mode="aes-512"`}},
		{"state without dir", &Options{TPM2: true, State: &StateOptions{Backup: true}}, []string{"--tpmstate needs dir="}},
		{"empty state", &Options{TPM2: true, State: &StateOptions{}}, []string{"--tpmstate needs a value"}},
		{"two startups impossible", &Options{TPM2: true, Flags: FlagsOptions{Startup: "warm"}}, []string{`unknown sub-option "startup-warm"`}},
		{"bad seccomp", &Options{TPM2: true, Seccomp: "trap"}, []string{`unsupported action="trap"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args, err := Build(tt.o)
			if err == nil {
				t.Fatalf("Build = %q, want an error containing %q", args, tt.wantErr)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Build error %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

// TestNoCgo: the package links no cgo, so hostd and tests that only build command
// lines do not link libtpms.
func TestNoCgo(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool in PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", "{{.ImportPath}} {{len .CgoFiles}}", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkg, n, _ := strings.Cut(line, " ")
		if n != "0" || pkg == "runtime/cgo" {
			t.Errorf("swtpm/cmdline depends on %s, which has %s cgo files", pkg, n)
		}
	}
}
