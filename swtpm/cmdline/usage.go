package cmdline

// Usage is the help text of `nkp-swtpm socket --help`.
const Usage = `Usage: nkp-swtpm socket [options]

nkp-swtpm is a vTPM 2.0 (libtpms) that speaks swtpm's control and data protocol, so
QEMU (-tpmdev emulator), libvirt and the swtpm tools accept it in place of swtpm.
TPM 1.2 is not available: --tpm2 is required to run.

Options (as swtpm's; values in [] are optional):
--tpm2            choose TPM 2.0 (required except for --help, --version,
                  --print-capabilities)
--ctrl type=unixio,path=<path>|fd=<fd>|clientfd=<fd>[,mode=0...][,uid=..][,gid=..][,terminate]
--ctrl type=tcp,port=<port>[,bindaddr=<addr>[,ifname=<if>]]|fd=<fd>[,terminate]
                  control channel; fd= is a listening socket, clientfd= a connected
                  one; terminate exits when the control connection is lost; without
                  --ctrl the TPM is served on --server alone (add --flags not-need-init)
--server [type=tcp][,port=<port>[,bindaddr=<addr>]][,fd=<fd>][,disconnect]
--server type=unixio,path=<path>|fd=<fd>[,mode=0...][,uid=..][,gid=..][,disconnect]
                  data channel (without it: SET_DATAFD on the control channel);
                  type=tcp,fd= is a connected socket, type=unixio,fd= a listening one;
                  disconnect closes the connection after each response
-p|--port <port>  legacy: --server type=tcp,port=<port>,disconnect
-f|--fd <fd>      legacy: data on the connected fd <fd>, terminate when it closes
-t|--terminate    exit when the data connection is lost
--tpmstate dir=<dir>|backend-uri=dir://<dir>[,mode=0...][,lock][,backup][,fsync][,accept-rollback]
--tpmstate backend-uri=file://<file or block device>[,mode=0...][,lock][,fsync]
                  state directory (or $TPM_PATH), or swtpm's linear file; always locked against a second
                  process; state files are written atomically and synced (fsync is
                  implied); backup keeps <file>.bak and falls back to it when a
                  file cannot be read; accept-rollback loads the older record of a
                  file whose newest one is damaged (losing that write) instead of
                  refusing to start (backup and accept-rollback: directory only)
--key file=<path>|fd=<fd>[,mode=aes-128-cbc|aes-256-cbc][,format=hex|binary][,remove]
--key pwdfile=<path>|pwdfd=<fd>[,mode=...][,kdf=pbkdf2|sha512][,remove]
                  key of the state files; nkp writes them with AES-256-GCM and reads
                  swtpm's AES-CBC files; without --key the state is plaintext (a
                  warning is logged); keys are never accepted in argv or environment
--migration-key   same sub-options: key of the state blobs on the control channel
--log file=<path>|fd=<fd>[,level=n][,prefix=<text>][,truncate]
                  log file (mode 0600; file=- disables logging); level >= 2 adds debug
--pid file=<path>|fd=<fd>
--flags [not-need-init][,startup-clear|startup-state|startup-deactivated|startup-none][,disable-auto-shutdown]
--locality [reject-locality-4][,allow-set-locality]
--migration [incoming][,release-lock-outgoing]
--seccomp action=none|log|kill
                  seccomp filter installed before the first client byte is read
                  (default kill, as swtpm): a denied system call (exec, fork,
                  ptrace, mount, module loading, bpf, keyctl, clock setting, ...)
                  kills the process with SIGSYS (kill), is allowed and logged by
                  the kernel (log), or no filter is installed (none)
-d|--daemon       run detached; the command returns once the daemon serves
-r|--runas <user> switch to this user before opening files and sockets
--print-capabilities  print the supported features as JSON and exit
--print-states    print the state blobs in --tpmstate as JSON and exit
--version         print the version and exit
-h|--help         print this help and exit
`
