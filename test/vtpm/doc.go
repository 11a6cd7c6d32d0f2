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
package vtpm
