// Package swtpmtools holds end-to-end tests that drive nkp-swtpm with the swtpm tools
// as clients (swtpm_ioctl, swtpm_bios, swtpm_setup, tpm2-tools through tpm2-tss'
// swtpm TCTI, and a go-tpm client for crash tests). Every test runs against Debian's
// swtpm too, as a reference that the test checks the right thing.
//
// The tests build cmd/nkp-swtpm once per run (or use $NKP_BIN/nkp-swtpm) and skip when
// a tool is missing, unless NKP_E2E=required. The package has no non-test code.
//
// What it covers, over the backend table {Debian swtpm, nkp-swtpm} started through
// test/vtpmproc: swtpm_ioctl (-c -i -e -h -r -l --info -g -b -C -v --save/--load
// --stop -s, unix and TCP), swtpm_bios, tpm2-tools through the swtpm: TCTI (unix and
// TCP), swtpm_setup (EKs with EK and platform certificates, --pwdfile and
// --pwdfile-fd; needs root for swtpm_localca), encrypted state (no plaintext of an NV
// value; a wrong key refused with the files unchanged), the state lock, -d with the
// key on an fd, --print-capabilities and --print-states, garbage, truncated, empty and
// read-only state, every --key form (swtpm writes, nkp-swtpm reads), state
// directories written by swtpm, GET/SET_STATEBLOB between swtpm and nkp-swtpm both
// ways (with and without a migration key), shared-storage migration
// (release-lock-outgoing and incoming), swtpm_setup --reconfigure --pcr-banks, -t and
// ctrl terminate, --runas, inherited listening sockets, a data-only TPM (no --ctrl), an empty working directory,
// and kill -9 during NV writes through a go-tpm client (up to 300 trials, 60 s per
// backend). Tests of features swtpm 0.7.1 lacks skip it by its --print-capabilities.
// TestIdleTrim runs nkp-swtpm alone (swtpm has no idle trim): after its idle delay
// the resident part of its program shrinks, and NV and PCR values read the same.
//
// TestUpstreamSuite runs swtpm's own TPM 2.0 test scripts against both backends, once
// per socket interface pair as upstream's wrappers do. They are vendored in
// testdata/swtpm-tests (BSD-3-Clause; its README.md says where they come from and what
// was changed: reconstructed from stored copies of github.com/stefanberger/swtpm, with
// the pcrUpdateCounter values libtpms 0.9.2 counts), so the test runs in CI. The state
// files some scripts copy from upstream's tests/data (binaries there) are made by the
// test with Debian's swtpm, in a copy of the scripts. $NKP_SWTPM_SRC, when set, names a
// swtpm source tree whose tests/ is run instead. The scripts need bash, socat, ss, file
// and su besides the swtpm tools; _test_tpm2_file_permissions (the TPM and
// swtpm_setup with --runas nobody) and test_tpm2_parameters (33 swtpm_setup runs with
// certificates by swtpm_localca) need root. A script that skips itself (exit 77)
// fails under NKP_E2E=required. Scripts for CUSE, chardev and vtpm-proxy modes are out
// of scope (nkp-swtpm runs only as `socket`); the table in upstream_test.go says why
// each left-out script is left out.
package swtpmtools
