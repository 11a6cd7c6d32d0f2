// Package cmdline is the command line of `nkp-swtpm socket`, which is swtpm's: the
// option types (Options and its parts), Parse, which reads an argv the way swtpm's
// getopt_long loop and option parser do (but stricter, with errors that name the option
// and what it accepts), and Build, which writes the argv for Options and checks it by
// parsing it back. Usage is the help text of `nkp-swtpm socket --help`.
//
// It does no I/O and links no cgo (no libtpms): files, fds and user names are checked
// when the options are used, by package swtpm/cli inside nkp-swtpm.
//
// Who may import it: swtpm/cli (the program), hostd and tests that start nkp-swtpm or
// swtpm with a checked command line, and any package that must read one. It imports
// only the standard library.
//
// The conventions of the parsed Options: an fd field is -1 when not given and a port
// -1 when not given; defaults are filled in (socket mode 0770, state mode 0640 with
// ModeDefault set, key format hex, passphrase kdf pbkdf2, bindaddr 127.0.0.1). Build
// accepts both those parsed values and hand-written literals, in which an fd of 0 also
// means "not given" (fd 0 is never valid here), so a caller writes only the fields it
// uses:
//
//	args, err := cmdline.Build(&cmdline.Options{
//		TPM2:  true,
//		Ctrl:  &cmdline.Channel{Type: cmdline.TypeUnixIO, Path: sock, Mode: 0o660},
//		State: &cmdline.StateOptions{Dir: dir, Mode: 0o600},
//		Key:   &cmdline.KeyOptions{FD: 3, Format: cmdline.FormatBinary, Mode: "aes-256-gcm"},
//	})
//	cmd := exec.Command("nkp-swtpm", append([]string{"socket"}, args...)...)
//
// # What Parse accepts
//
// swtpm 0.7.1's `socket` options as libvirt 9.0, swtpm_setup, swtpm_ioctl's users and
// QEMU's documentation use them (Usage), getopt-style: "--o v", "--o=v", unique
// abbreviations, grouped short options. Unknown options and sub-options, a sub-option
// given twice, values of the wrong type and contradictions are refused with a
// sentence naming the option and what is accepted. --tpm2 is required (TPM 2.0 only)
// except with --print-capabilities, --help and --version. Differences from swtpm:
//   - --key and --migration-key without mode=: the key's length decides (swtpm
//     assumes aes-128-cbc); mode=aes-256-gcm is accepted (nkp only);
//   - --tpmstate: lock=false is refused (the state is always locked, the linear file
//     too, where swtpm locks only with lock), fsync is accepted (nkp always syncs),
//     accept-rollback is nkp's own (state.Options.AcceptRollback); backend-uri=file://
//     (StateOptions.File) takes mode, lock and fsync only; no --tpmstate means
//     $TPM_PATH (swtpm/cli);
//   - refused with a reason: --chroot/-R, --profile, --print-profiles, --print-info,
//     --pcap.
//
// swtpm's fd quirk is resolved in Channel (ListenFD or ConnFD); connected streams
// imply --terminate, as in swtpm.
package cmdline
