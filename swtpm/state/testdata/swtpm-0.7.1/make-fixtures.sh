#!/bin/bash
# Regenerates the swtpm-made fixtures in this directory with the swtpm installed on the
# machine (they were made with Debian's swtpm 0.7.1). The keys here are test keys only.
#
# Each subdirectory holds the state directory swtpm wrote (tpm2-00.permall and
# tpm2-00.volatilestate), the key it was given, and ref.permall: the permanent-state
# payload of that same TPM, taken over the control channel with GET_STATEBLOB(DECRYPTED)
# (swtpm_ioctl --save), so a test can check that decrypting the file gives these bytes.
set -euo pipefail
cd "$(dirname "$0")"
[ -f key256.hex ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > key256.hex
[ -f key128.hex ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > key128.hex
[ -f passphrase.txt ] || printf 'correct horse battery staple\n' > passphrase.txt

run() { # run NAME [swtpm key options...]
	local name=$1; shift
	local tmp; tmp=$(mktemp -d)
	rm -rf "$name"; mkdir -p "$name"
	swtpm socket --tpmstate dir="$name" --tpm2 --ctrl type=unixio,path="$tmp/ctrl" \
		--flags not-need-init,startup-clear "$@" &
	local pid=$!
	for _ in $(seq 200); do [ -S "$tmp/ctrl" ] && break; sleep 0.01; done
	swtpm_ioctl --unix "$tmp/ctrl" -v
	swtpm_ioctl --unix "$tmp/ctrl" --save permanent "$tmp/mig"
	swtpm_ioctl --unix "$tmp/ctrl" -s
	wait "$pid"
	# ref.permall = the TLV1 payload inside the plain migration blob TLV4{TLV1}.
	tail -c +23 "$tmp/mig" > "$name/ref.permall"
	rm -f "$name/.lock"
	rm -rf "$tmp"
}
run plain
run key256-hex --key file=key256.hex,mode=aes-256-cbc
run key128-hex --key file=key128.hex
run pwd-pbkdf2 --key pwdfile=passphrase.txt,mode=aes-256-cbc
run pwd-sha512 --key pwdfile=passphrase.txt,mode=aes-256-cbc,kdf=sha512

# The linear file backend (backend-uri=file://): NAME/linear.img holds every blob in
# swtpm's linear layout, NAME/ref.permall is the permanent state as above.
run_linear() { # run_linear NAME [swtpm key options...]
	local name=$1; shift
	local tmp; tmp=$(mktemp -d)
	rm -rf "$name"; mkdir -p "$name"
	swtpm socket --tpmstate backend-uri="file://$PWD/$name/linear.img" --tpm2 \
		--ctrl type=unixio,path="$tmp/ctrl" --flags not-need-init,startup-clear "$@" &
	local pid=$!
	for _ in $(seq 200); do [ -S "$tmp/ctrl" ] && break; sleep 0.01; done
	swtpm_ioctl --unix "$tmp/ctrl" -v
	swtpm_ioctl --unix "$tmp/ctrl" --save permanent "$tmp/mig"
	swtpm_ioctl --unix "$tmp/ctrl" -s
	wait "$pid"
	tail -c +23 "$tmp/mig" > "$name/ref.permall"
	rm -rf "$tmp"
}
run_linear linear-plain
run_linear linear-key256 --key file=key256.hex,mode=aes-256-cbc
