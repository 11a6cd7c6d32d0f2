#!/usr/bin/env bash
# nkp demo (the README's main job, `sudo make demo`), on one machine with embedded defaults
# and no real TPM:
#   1. initialise a key provider and take its backup (it releases no KDK before that);
#   2. join nkp-hostd to it with a socket TPM as the host TPM (nkp-swtpm), and install the
#      libvirt hook;
#   3. define a small VM with a data disk and `nkpctl vm protect` it: it gets an nkp vTPM,
#      and its disk is converted into a LUKS image whose key lives in a libvirt secret;
#   4. `virsh start`: the guest shows its TPM 2.0, writes a value into TPM NV and a marker
#      onto its disk; the host's disk file does not hold the marker;
#   5. `virsh start` again: the NV value and the disk marker survived the power cycle;
#   6. stop the provider, restart nkp-hostd, `virsh start` again: the VM starts with the
#      KDK from the host TPM's cache, its disk opens, NV value and marker are still there.
# Everything lives in a temporary directory and is removed at the end (also on failure).
#
# Needs root, `make setup` (packages, libvirtd) and `make build`. Exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

say() { printf '\ndemo: %s\n' "$*"; }
run() { printf '  $ %s\n' "$*"; "$@"; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make demo): libvirt's system connection, the hook and the vTPM user need it"
BIN=${NKP_BIN:-$PWD/bin}
for b in nkp-provider nkpctl nkp-hostd nkp-swtpm nkp-hook; do
	[ -x "$BIN/$b" ] || die "no $BIN/$b: run \`make build\` first"
done
virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer: run \`make setup\` first"
id tss >/dev/null 2>&1 || die "no user tss to run the vTPMs (Debian's tpm2-tools/swtpm packages create it: make setup)"

say "building the tiny guest (kernel + busybox initramfs with a go-tpm agent; cached in test/guest/out)"
eval "$(go run ./test/guest/cmd/guest-build | grep '^NKP_GUEST_[A-Z]*=/[A-Za-z0-9._/-]*$')"
[ -n "${NKP_GUEST_KERNEL:-}" ] && [ -n "${NKP_GUEST_INITRD:-}" ] || die "the guest builder printed no kernel/initrd"

W=$(mktemp -d /tmp/nkp-demo.XXXXXX)
chmod 0711 "$W" # QEMU (libvirt-qemu) and the vTPM user (tss) traverse it
TAG=$(basename "$W" | cut -d. -f2)
NAME=nkp-demo-$TAG
HOOK=/etc/libvirt/hooks/qemu.d/nkp-demo-$TAG
PROV_PID= TPM_PID= HOSTD_PID= SECRET=
stop_pid() { # pid: SIGTERM, wait up to 30 s, then SIGKILL
	[ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
	kill "$1" 2>/dev/null || true
	for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
	kill -9 "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}
cleanup() {
	virsh -c qemu:///system destroy "$NAME" >/dev/null 2>&1 || true
	virsh -c qemu:///system undefine "$NAME" >/dev/null 2>&1 || true
	# nkp-hostd undefines the disk's secret on the UNDEFINED event; it may stop first.
	[ -z "$SECRET" ] || virsh -c qemu:///system secret-undefine "$SECRET" >/dev/null 2>&1 || true
	rm -f "$HOOK"
	stop_pid "$HOSTD_PID"
	stop_pid "$TPM_PID"
	stop_pid "$PROV_PID"
	rm -rf "$W"
}
trap cleanup EXIT

wait_for() { # seconds what command...: poll the command until it succeeds, or die
	local secs=$1 what=$2
	local end=$((SECONDS + secs))
	shift 2
	while [ "$SECONDS" -lt "$end" ]; do "$@" && return 0; sleep 0.2; done
	die "$what did not happen within $secs s"
}

# 1. The provider.
say "1. a key provider: init, serve, backup (no KDK is released before a backup exists)"
run "$BIN/nkp-provider" init --dir "$W/provider" --log-format text >"$W/provider-init.log" 2>&1 || die "nkp-provider init: $(cat "$W/provider-init.log")"
"$BIN/nkp-provider" serve --dir "$W/provider" --listen 127.0.0.1:0 --log-format json 2>"$W/provider.log" &
PROV_PID=$!
wait_for 60 "nkp-provider serving" grep -q '"msg":"provider serving"' "$W/provider.log"
ADDR=$(grep -o '"msg":"provider serving","addr":"[^"]*"' "$W/provider.log" | head -n1 | sed 's/.*"addr":"\([^"]*\)"/\1/')
URL=https://$ADDR
echo "  nkp-provider serves $URL (pid $PROV_PID)"
(umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$W/backup.pass")
# (The backup's scrypt can outlast nkpctl's request timeout on a very loaded machine: 3 tries.)
for try in 1 2 3; do
	run "$BIN/nkpctl" provider --dir "$W/provider" --provider "$URL" backup --passphrase-file "$W/backup.pass" --out "$W/backup.age" >/dev/null && break
	[ "$try" = 3 ] && die "the backup failed three times"
done
echo "  backup written to $W/backup.age (age-encrypted; opens with the age tool too)"

# 2. The host: a socket TPM, join, serve, the hook.
say "2. this host: a socket TPM as host TPM, nkp-hostd join (token from a file), serve, the libvirt hook"
mkdir -m 0700 "$W/hosttpm" "$W/hosttpm/state"
"$BIN/nkp-swtpm" socket --tpm2 --server "type=unixio,path=$W/hosttpm/data.sock" --ctrl "type=unixio,path=$W/hosttpm/ctrl.sock" \
	--tpmstate "dir=$W/hosttpm/state" --flags not-need-init,startup-clear --log "file=$W/hosttpm/log" 2>>"$W/hosttpm/log" &
TPM_PID=$!
wait_for 30 "the host TPM's socket" test -S "$W/hosttpm/data.sock"
TPMSPEC="swtpm:path=$W/hosttpm/data.sock,ctrl=$W/hosttpm/ctrl.sock"
TOKEN_JSON=$("$BIN/nkpctl" provider --dir "$W/provider" --provider "$URL" token create --ttl 10m --json)
(umask 077 && printf '%s' "$TOKEN_JSON" | sed -n 's/.*"secret": *"\([^"]*\)".*/\1/p' >"$W/token")
CAHASH=$(printf '%s' "$TOKEN_JSON" | sed -n 's/.*"ca_hash": *"\([^"]*\)".*/\1/p')
[ -s "$W/token" ] && [ -n "$CAHASH" ] || die "token create printed no secret or CA hash"
mkdir -m 0711 "$W/run"
HOSTD=("$BIN/nkp-hostd")
STATE=(--state-dir "$W/hostd")
run "${HOSTD[@]}" join --provider "$URL" --ca-hash "$CAHASH" --token-file "$W/token" --tpm "$TPMSPEC" "${STATE[@]}" --hostname "demo-$TAG" --log-format text
rm -f "$W/token"
start_hostd() {
	NOTIFY_SOCKET= "${HOSTD[@]}" serve "${STATE[@]}" --run-dir "$W/run" --tpm "$TPMSPEC" --swtpm "$BIN/nkp-swtpm" --log-format text 2>>"$W/hostd.log" &
	HOSTD_PID=$!
	wait_for 60 "nkp-hostd serving" test -S "$W/run/hostd.sock"
	wait_for 60 "nkp-hostd answering on its local API" "$BIN/nkpctl" vm --socket "$W/run/hostd.sock" status >/dev/null 2>&1
}
start_hostd
echo "  nkp-hostd serves (pid $HOSTD_PID): hook socket $W/run/hook.sock, local API $W/run/hostd.sock"
# The hook: nkp-hook asking this demo's hostd. libvirtd looks for hook files when it
# starts or gets SIGHUP; a file added to an existing qemu.d is seen as it is.
HUP=no
{ [ -e /etc/libvirt/hooks/qemu ] || [ -n "$(ls -A /etc/libvirt/hooks/qemu.d 2>/dev/null)" ]; } || HUP=yes
mkdir -p /etc/libvirt/hooks/qemu.d
printf '#!/bin/sh\nexec %s --socket=%s "$@"\n' "$BIN/nkp-hook" "$W/run/hook.sock" >"$HOOK.tmp"
chmod 0755 "$HOOK.tmp" && mv "$HOOK.tmp" "$HOOK"
echo "  hook installed: $HOOK (domains without nkp metadata pass it untouched)"
if [ "$HUP" = yes ]; then
	for pf in /run/nkp-test/libvirtd.pid /run/libvirtd.pid; do
		if [ -s "$pf" ]; then kill -HUP "$(cat "$pf")" && echo "  libvirtd (pid $(cat "$pf")) reloaded to see its first hook" && break; fi
	done
	sleep 1
fi

# 3. The VM.
say "3. a small VM (TCG, 256 MiB, a 32 MiB data disk, no TPM yet), then nkpctl vm protect"
cp "$NKP_GUEST_KERNEL" "$W/vmlinuz"
cp "$NKP_GUEST_INITRD" "$W/initrd.gz"
CONSOLE=$W/console.log
NV=demo-$TAG
MARK=disk-marker-$TAG-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
DISK=$W/disk.raw
truncate -s 32M "$DISK"
cat >"$W/domain.xml" <<XML
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$W/vmlinuz</kernel>
    <initrd>$W/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet loglevel=1 panic=-1 no_timer_check nkp.do=nvwrite,diskwrite nkp.nv=$NV nkp.disk=$MARK</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='$CONSOLE' append='on'/><target port='0'/></serial>
    <console type='file'><source path='$CONSOLE' append='on'/><target type='serial' port='0'/></console>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$DISK'/><target dev='vda' bus='virtio'/></disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
run virsh -c qemu:///system define "$W/domain.xml" >/dev/null
run "$BIN/nkpctl" vm --socket "$W/run/hostd.sock" protect "$NAME"
echo "  the domain's TPM now:"
virsh -c qemu:///system dumpxml "$NAME" | sed -n '/<tpm /,/<\/tpm>/p' | sed 's/^/    /'
echo "  its disk now (a LUKS image next to the original, the key in a libvirt secret):"
virsh -c qemu:///system dumpxml "$NAME" | sed -n '/<disk /,/<\/disk>/p' | sed 's/^/    /'
echo "  nkp's metadata in it:"
virsh -c qemu:///system dumpxml "$NAME" | sed -n '/<nkp:vm/,/<\/nkp:vm>/p' | sed 's/^/    /'
NEWDISK=$(virsh -c qemu:///system dumpxml "$NAME" | sed -n "/<disk /,/<\/disk>/s/.*<source file='\([^']*\)'.*/\1/p" | head -n1)
[ -n "$NEWDISK" ] && [ "$NEWDISK" != "$DISK" ] || die "protect left the disk at '$NEWDISK'"
SECRET=$(virsh -c qemu:///system dumpxml "$NAME" | sed -n "s/.*<secret type='passphrase' uuid='\([^']*\)'.*/\1/p" | head -n1)
echo "  the libvirt secret $SECRET: $(virsh -c qemu:///system secret-dumpxml "$SECRET" | head -n1 | sed 's/^ *//')"
if virsh -c qemu:///system secret-get-value "$SECRET" >/dev/null 2>&1; then die "virsh secret-get-value revealed the disk key"; fi
echo "  virsh secret-get-value $SECRET is refused (the secret is private)"

# boot: virsh start, wait for this boot's verdict and the power-off, print the agent's lines.
BOOTS=0
boot() {
	local before
	before=$(grep -ac 'NKP-GUEST done=' "$CONSOLE" 2>/dev/null || true)
	before=${before:-0}
	run virsh -c qemu:///system start "$NAME" >/dev/null
	wait_for 300 "the guest's verdict" sh -c "[ \"\$(grep -ac 'NKP-GUEST done=' '$CONSOLE' 2>/dev/null)\" -gt $before ] || virsh -c qemu:///system domstate '$NAME' 2>/dev/null | grep -q 'shut off'"
	[ "$(grep -ac 'NKP-GUEST done=' "$CONSOLE")" -gt "$before" ] || die "the VM stopped without the guest's verdict; console: $(tail -n 8 "$CONSOLE")"
	wait_for 120 "the guest to power off" sh -c "virsh -c qemu:///system domstate '$NAME' 2>/dev/null | grep -q 'shut off'"
	BOOTS=$((BOOTS + 1))
	echo "  the guest's TPM, as the guest sees it (boot $BOOTS):"
	# This boot's lines: everything after the $before-th verdict.
	awk -v n="$before" '/NKP-GUEST done=/{c++; if (c<=n) next} c>=n' "$CONSOLE" | grep -a 'NKP-GUEST ' | grep -av 'poweroff=' | sed 's/^.*NKP-GUEST /    /'
	awk -v n="$before" '/NKP-GUEST done=/{c++; if (c<=n) next} c>=n' "$CONSOLE" | grep -aq 'NKP-GUEST done=ok' || die "the guest agent failed (see above)"
}
last_nv() { grep -ao ' nv=[A-Za-z0-9._-]*' "$CONSOLE" | tail -n1 | cut -d= -f2; }
last_mark() { grep -ao ' disk-vda=[A-Za-z0-9._-]*' "$CONSOLE" | tail -n1 | cut -d= -f2; }
set_job() { # the guest's job for the next boots, in the kernel command line (nkp's metadata stays)
	virsh -c qemu:///system dumpxml --inactive --security-info "$NAME" | sed "s|nkp.do=[a-z,]*|nkp.do=$1|; s| nkp.disk=[A-Za-z0-9._-]*||" >"$W/domain2.xml"
	virsh -c qemu:///system define "$W/domain2.xml" >/dev/null
}
check_disk() { # what: the guest read the marker; the host file does not hold it
	[ "$(last_mark)" = "$MARK" ] || die "$1: the guest reads disk marker '$(last_mark)', want '$MARK'"
	if grep -aq "NKP-DISK-MARKER $MARK" "$NEWDISK"; then die "the host file $NEWDISK holds the guest's marker in plaintext"; fi
	echo "  the guest reads '$MARK' from its disk; \`grep -c '$MARK' $NEWDISK\` on the host: $(grep -ac "$MARK" "$NEWDISK" || true) (encrypted)"
}

# 4. First boot.
say "4. virsh start: the guest checks its TPM 2.0, writes '$NV' into an NV index and '$MARK' onto its disk"
boot
[ "$(last_nv)" = "$NV" ] || die "the guest wrote NV '$(last_nv)', want '$NV'"
check_disk "first boot"

# 5. Power cycle.
say "5. virsh start again (the guest only reads NV and its disk now): both survived the power cycle"
set_job nvread,diskread
boot
[ "$(last_nv)" = "$NV" ] || die "after a power cycle the guest reads NV '$(last_nv)', want '$NV'"
check_disk "after a power cycle"
run "$BIN/nkpctl" vm --socket "$W/run/hostd.sock" protect --finalize "$NAME"
[ ! -e "$DISK" ] || die "protect --finalize left the original disk $DISK"

# 6. Provider down.
say "6. the provider goes down and nkp-hostd restarts: the VM still starts (KDK from the host TPM)"
stop_pid "$PROV_PID"
PROV_PID=
echo "  nkp-provider stopped"
stop_pid "$HOSTD_PID"
start_hostd
echo "  nkp-hostd restarted (pid $HOSTD_PID) with the provider unreachable"
boot
[ "$(last_nv)" = "$NV" ] || die "with the provider down the guest reads NV '$(last_nv)', want '$NV'"
check_disk "with the provider down"
grep -q 'unreachable' "$W/hostd.log" && echo "  nkp-hostd's log: $(grep -o 'the provider is unreachable[^"]*' "$W/hostd.log" | head -n1)"
run "$BIN/nkpctl" vm --socket "$W/run/hostd.sock" status "$NAME"

say "OK: a VM protected by nkp booted three times with its vTPM state and its disk encrypted under keys derived from the cluster KDK; its NV value and disk marker survived power cycles and a start with the provider down, and the host's disk file never held the marker in plaintext"
