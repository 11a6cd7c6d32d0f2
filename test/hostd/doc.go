// Package hostd holds nkp's end-to-end tests of the host side: real libvirtd, QEMU under
// TCG, the real nkp-provider and nkp-hostd, the tiny guest of test/guest with its go-tpm
// agent, and several "hosts" on one machine, each a private libvirtd in its own mount and
// network namespace (test/libvirtns) so that hooks, /run/nkp and /var/lib/nkp are its
// own, VMs can be saved on one host and restored on another, and live-migrated between
// them over a veth pair.
//
// Run with `go test -count=1 -p 1 ./test/hostd/...` as root after `make setup`. Nothing
// here imports this package; its code is all in _test.go files.
//
// The tests (about 12 minutes on a loaded 2-core machine): TestTwoHostsPlainVM
// (libvirt's swtpm VM: hooks per host, live migration A to B, save on B and restore
// on A, libvirtd restart and the reconnect hook); TestHookWithoutHostd (the real
// nkp-hook: a plain domain starts, a protected one is refused naming the VM and its
// key, direct calls with garbage); TestProtectedVM (protect through hostd's API, a
// socket host TPM served by nkp-swtpm, NV across power cycles, hostd restart, kill -9,
// libvirtd restart, save and restore, the provider stopped and hostd restarted);
// TestRefusals (another provider, unknown KDK version, KDK ID mismatch, revoked host:
// starts refused, running VM kept); TestTwoHostsProtected (save and restore both ways,
// live migration on tpm-tis, one host's KDK blob copied into the other's cache
// refused); TestRekeyAndAdopt (rotation seen by hostd, rekey through the API keeps NV,
// the old version retired, then a boot; a VM with libvirt's own swtpm adopted by
// protect with its NV); TestEncryptedDisks (two hosts: protect converts a raw disk and a
// qcow2 disk with a backing chain to LUKS, the guest's marker readable inside and absent
// from the host files, QEMU's query-block says encrypted, secrets ephemeral and private
// and back after a libvirtd restart, save on A restored on B refused until B's hostd has
// the secrets then retried, live migration back, finalize, a wrong-key image refused
// naming disk and key, shallow and deep rekey then retire, hostd killed during protect,
// ENOSPC on a loop-mounted file system, an already encrypted disk refused, the provider
// down and hostd restarted); TestUEFI (q35 with OVMF and Secure Boot, libvirt's
// autoselection with its swtpm on tpm-crb adopted, and an explicit loader and NVRAM
// template with a new vTPM on tpm-tis, manufactured by swtpm_setup with the domain's
// <active_pcr_banks>: the guest sees only those banks and an RSA EK certificate; the
// guest booted directly by OVMF sees its TPM with the firmware's measurements, PCR 0 equal to its event log's replay and
// SecureBoot=1 measured, EK and NV kept, status ok, a virsh reset (a reboot) re-measured
// into reset PCRs; protect, rekey and unprotect keep the firmware XML byte for byte and
// the NVRAM file untouched). Fixtures: startProvider (init, serve, backup, tokens in
// 0600 files), startHostTPM, joinHost (join and serve inside a host, /healthz polled)
// and nkpVM (protect, define, boot, start, runsOn).
package hostd
