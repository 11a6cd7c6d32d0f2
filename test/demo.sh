#!/usr/bin/env bash
# nkp demo (the README's main job, `sudo make demo`): boot a tiny VM through libvirt with
# an nkp-swtpm vTPM whose state is encrypted under a random 256-bit key passed by fd,
# show what the guest's TPM reports, then stop and clean up. Exits non-zero on failure.
#
# Needs root, `make setup` (packages, libvirtd) and `make build` (bin/nkp-swtpm).
# NKP_SWTPM=/path/to/backend overrides the vTPM program (e.g. /usr/bin/swtpm to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make demo): libvirt's system connection and QEMU's socket permissions need it"
BACKEND=${NKP_SWTPM:-${NKP_BIN:-$PWD/bin}/nkp-swtpm}
[ -x "$BACKEND" ] || die "no vTPM program at $BACKEND: run \`make build\` first"
virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer: run \`make setup\` first"

say "building the tiny guest (kernel + busybox initramfs with a go-tpm agent; cached in test/guest/out)"
eval "$(go run ./test/guest/cmd/guest-build | grep '^NKP_GUEST_[A-Z]*=/[A-Za-z0-9._/-]*$')"
[ -n "${NKP_GUEST_KERNEL:-}" ] && [ -n "${NKP_GUEST_INITRD:-}" ] || die "the guest builder printed no kernel/initrd"

W=$(mktemp -d /tmp/nkp-demo.XXXXXX)
chmod 0711 "$W" # QEMU (libvirt-qemu) must reach the socket, the console and the guest files
NAME=nkp-demo-$(basename "$W" | cut -d. -f2)
BPID=
cleanup() {
	virsh -c qemu:///system destroy "$NAME" >/dev/null 2>&1 || true
	if [ -n "$BPID" ] && kill -0 "$BPID" 2>/dev/null; then kill "$BPID"; wait "$BPID" 2>/dev/null || true; fi
	rm -rf "$W"
}
trap cleanup EXIT

# The state key: 32 random bytes in a 0600 file inside a 0700 directory, handed over on fd 3.
mkdir -m 0700 "$W/keys" "$W/state"
(umask 077 && head -c 32 /dev/urandom >"$W/keys/vtpm.key")
SOCK=$W/vtpm.sock
"$BACKEND" socket --tpm2 --tpmstate "dir=$W/state,mode=0600" \
	--ctrl "type=unixio,path=$SOCK,mode=0660" \
	--key fd=3,format=binary,mode=aes-256-cbc \
	--log "file=$W/vtpm.log" --terminate 3<"$W/keys/vtpm.key" &
BPID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
[ -S "$SOCK" ] || die "$(basename "$BACKEND") did not open $SOCK: $(tail -n 5 "$W/vtpm.log" 2>/dev/null)"
chgrp kvm "$SOCK" # QEMU runs as libvirt-qemu:kvm under libvirt
say "started $(basename "$BACKEND") (pid $BPID): state $W/state encrypted under a fresh 256-bit key (fd 3), control socket $SOCK"

cp "$NKP_GUEST_KERNEL" "$W/vmlinuz"
cp "$NKP_GUEST_INITRD" "$W/initrd.gz"
CONSOLE=$W/console.log
cat >"$W/domain.xml" <<XML
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$W/vmlinuz</kernel>
    <initrd>$W/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet loglevel=1 panic=-1</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='$CONSOLE'/><target port='0'/></serial>
    <console type='file'><source path='$CONSOLE'/><target type='serial' port='0'/></console>
    <tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='$SOCK'/></backend></tpm>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -c qemu:///system create "$W/domain.xml" >/dev/null || die "virsh create refused the domain"
say "virsh started domain $NAME (TCG, 256 MiB) with <tpm model='tpm-crb'><backend type='external'> on that socket"

# The serial port writes a line byte by byte: wait for a whole verdict, not its first bytes.
for _ in $(seq 1800); do grep -aEq 'NKP-GUEST done=(ok|fail)' "$CONSOLE" 2>/dev/null && break; sleep 0.1; done
grep -aEq 'NKP-GUEST done=(ok|fail)' "$CONSOLE" 2>/dev/null || die "no result from the guest within 180 s; console: $(tail -n 5 "$CONSOLE" 2>/dev/null)"
say "the guest's TPM, as the guest sees it:"
grep -a 'NKP-GUEST ' "$CONSOLE" | grep -av 'poweroff=' | sed 's/^.*NKP-GUEST /  /'

grep -aq 'NKP-GUEST done=ok' "$CONSOLE" || die "the guest agent failed (see above)"
grep -aq 'NKP-GUEST tpm=2.0' "$CONSOLE" || die "the guest did not see a TPM 2.0"
PCR0=$(grep -ao 'NKP-GUEST pcr0=[0-9a-f]*' "$CONSOLE" | head -n1 | cut -d= -f2)
[ ${#PCR0} = 64 ] && [ "$PCR0" != "$(printf '0%.0s' $(seq 64))" ] || die "PCR0 is not a firmware measurement: '$PCR0'"

for _ in $(seq 600); do virsh -c qemu:///system domstate "$NAME" >/dev/null 2>&1 || break; sleep 0.1; done
for _ in $(seq 300); do kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$BPID" 2>/dev/null; then die "$(basename "$BACKEND") still runs after the VM powered off"; fi
wait "$BPID" || die "$(basename "$BACKEND") exited with status $?: $(tail -n 5 "$W/vtpm.log")"
BPID=
say "the guest powered off; the vTPM ended with QEMU; state files: $(ls "$W/state" | tr '\n' ' ')"
say "OK: a VM booted with an encrypted nkp vTPM 2.0 and a firmware-measured PCR0"
