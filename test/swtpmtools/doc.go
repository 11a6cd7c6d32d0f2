// Package swtpmtools holds end-to-end tests that drive nkp-swtpm with the swtpm tools
// as clients (swtpm_ioctl, swtpm_bios, swtpm_setup, tpm2-tools through tpm2-tss'
// swtpm TCTI, and a go-tpm client for crash tests). Every test runs against Debian's
// swtpm too, as a reference that the test checks the right thing.
//
// The tests build cmd/nkp-swtpm once per run (or use $NKP_BIN/nkp-swtpm) and skip when
// a tool is missing, unless NKP_E2E=required. The package has no non-test code.
package swtpmtools
