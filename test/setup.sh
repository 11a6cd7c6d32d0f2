#!/usr/bin/env bash
# Installs the Debian packages nkp's tests and demo need and starts the services they use
# (virtlogd, libvirtd). Idempotent; run as root. etcd is started by the tests themselves.
set -euo pipefail

PKGS=(libvirt-daemon-system libvirt-dev libvirt-clients qemu-system-x86 qemu-utils
      swtpm swtpm-tools libtpms-dev libssl-dev tpm2-tools ovmf seabios busybox-static cpio iproute2 socat file
      etcd-server etcd-client age gcc make systemd e2fsprogs mount)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# The guest builder uses `apt-get download`, which needs package lists even when every
# package above is installed.
if [ ${#missing[@]} -gt 0 ] || ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

alive() { # pidfile -> 0 if the process runs and is not a zombie
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/stat" ] || return 1
  ! awk '{exit !($3=="Z")}' "/proc/$pid/stat"
}

mkdir -p /run/nkp-test
if ! alive /run/nkp-test/virtlogd.pid; then
  virtlogd -d -p /run/nkp-test/virtlogd.pid
fi
if ! alive /run/nkp-test/libvirtd.pid; then
  libvirtd -d -p /run/nkp-test/libvirtd.pid
fi
for i in $(seq 1 300); do
  if virsh -c qemu:///system list >/dev/null 2>&1; then
    echo "setup: libvirtd answers"
    exit 0
  fi
  sleep 0.1
done
echo "setup: libvirtd did not answer within 30 s" >&2
exit 1
