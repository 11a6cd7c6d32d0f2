#!/bin/bash
# Regenerates the swtpm-made migration blobs in this directory with the swtpm on this
# machine (made with Debian's swtpm 0.7.1). Keys here are test keys only.
#
# For each configuration NAME: NAME.dec.permall is GET_STATEBLOB(permanent) with the
# DECRYPTED flag (as QEMU asks), NAME.enc.permall the same without it (as a client that
# wants the state key's layer kept) and NAME.enc.flags the reply's flags. Both blobs of
# one NAME come from the same TPM, so they must unwrap to the same libtpms payload.
set -euo pipefail
cd "$(dirname "$0")"
[ -f state256.hex ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > state256.hex
[ -f mig256.hex ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > mig256.hex
[ -f mig128.hex ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > mig128.hex

run() { # run NAME [swtpm key options...]
	local name=$1; shift
	local tmp; tmp=$(mktemp -d)
	swtpm socket --tpmstate dir="$tmp" --tpm2 --ctrl type=unixio,path="$tmp/ctrl" \
		--flags not-need-init,startup-clear "$@" &
	local pid=$!
	for _ in $(seq 200); do [ -S "$tmp/ctrl" ] && break; sleep 0.01; done
	python3 getblob.py "$tmp/ctrl" 1 1 "$name.dec.permall" >/dev/null
	python3 getblob.py "$tmp/ctrl" 1 0 "$name.enc.permall" | sed -n 's/.* flags \([0-9]*\) .*/\1/p' > "$name.enc.flags"
	swtpm_ioctl --unix "$tmp/ctrl" -s
	wait "$pid"
	rm -rf "$tmp"
}
run plain
run mig256 --migration-key file=mig256.hex,mode=aes-256-cbc
run mig128 --migration-key file=mig128.hex
run state256 --key file=state256.hex,mode=aes-256-cbc
run both --key file=state256.hex,mode=aes-256-cbc --migration-key file=mig256.hex,mode=aes-256-cbc
