// Package hostd holds nkp's end-to-end tests of the host side: real libvirtd, QEMU under
// TCG, the real nkp-provider and nkp-hostd, the tiny guest of test/guest with its go-tpm
// agent, and several "hosts" on one machine, each a private libvirtd in its own mount and
// network namespace (test/libvirtns) so that hooks, /run/nkp and /var/lib/nkp are its
// own, VMs can be saved on one host and restored on another, and live-migrated between
// them over a veth pair.
//
// Run with `go test -count=1 -p 1 ./test/hostd/...` as root after `make setup`. Nothing
// here imports this package; its code is all in _test.go files.
package hostd
