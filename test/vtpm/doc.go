// Package vtpm holds the end-to-end tests of the vTPM backend with real peers: a tiny
// guest (package test/guest) booted under QEMU TCG, directly and through libvirt's
// external TPM backend, across power cycles, virsh save/restore and QEMU live migration.
//
// Every test runs against each backend of a table: Debian's `swtpm socket` (so the test
// itself is known to be right) and nkp's `nkp-swtpm socket` ($NKP_BIN/nkp-swtpm, else
// built from ./cmd/nkp-swtpm). Both get the same swtpm command line, with the state
// encrypted under a random key passed on fd 3. Tests skip when a tool is missing unless
// NKP_E2E=required. They need root (libvirt's system connection, chown of sockets).
//
// The package has no non-test code; nothing imports it.
//
// What runs: a plain QEMU power cycle (also swtpm's state continued by nkp-swtpm, and
// a wrong key refused with the files unchanged); libvirt's <backend type='external'>;
// virsh save and restore into a fresh backend on an empty state directory (all four
// backend pairs); QEMU live migration over QMP (all four pairs) on tpm-tis, because
// QEMU 7.2's tpm-crb can lose a response that completes during the final stop of a
// live migration. QEMU 7.2's TCG migration on a loaded host sometimes resumes a guest
// with corrupt RAM (a kernel panic in the timer interrupt, or the agent killed at a
// wild PC), with swtpm as with nkp-swtpm: the migration is repeated at most twice,
// logging RETRY n of 2, only when the destination console shows such a crash; a TPM
// assertion or done=fail is never retried. A destination that hangs without a line
// logs QEMU's info registers.
//
// TestLibvirtEmulator runs nkp-swtpm as libvirt's own swtpm (<backend
// type='emulator'> with an encryption secret; four domains: nkp-swtpm from the first
// start, a state Debian's swtpm made taken over, back to swtpm by save and restore, a
// wrong secret refused with the state untouched). A private copy of nkp-swtpm is
// bind-mounted over /usr/bin/swtpm only while virsh start or restore run, under the
// host-wide flock /run/lock/nkp-test-swtpm.lock; a stale mount of a killed run
// (recognised by nkp-emulator-swtpm- in its source) is removed at start, any other
// mount fails the test, and leftover nkp-emu-* domains and secrets are undefined
// under that lock. It gives /var/lib/swtpm-localca's files to tss (swtpm_setup runs
// as tss under libvirt). Another process running /usr/bin/swtpm at that moment would
// get nkp-swtpm: end-to-end packages run one at a time (make e2e: -p 1).
package vtpm
