package cli

import (
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Version is nkp-swtpm's version, printed by --version and in --print-capabilities.
const Version = "0.1.0"

// Features lists the swtpm capability strings nkp-swtpm really supports, in swtpm's
// order. libvirt 9.0 looks for cmdarg-pwd-fd and cmdarg-migration; swtpm_setup for
// cmdarg-pwd-fd, cmdarg-key-fd, tpmstate-opt-lock and the rsa-keysize-* entries.
// cmdarg-seccomp: --seccomp action=kill|log|none installs package swtpm/seccomp's
// filter (default kill, as swtpm). Not listed on purpose: tpm-1.2 (TPM 2.0 only),
// cmdarg-chroot, the profile options, cmdarg-pcap and systemd-notify.
var Features = []string{
	"tpm-2.0",
	"tpm-send-command-header",
	"flags-opt-startup",
	"flags-opt-disable-auto-shutdown",
	"ctrl-opt-terminate",
	"cmdarg-seccomp",
	"cmdarg-key-fd",
	"cmdarg-pwd-fd",
	"cmdarg-print-states",
	"cmdarg-migration",
	"nvram-backend-dir",
	"nvram-backend-file",
	"rsa-keysize-1024",
	"rsa-keysize-2048",
	"rsa-keysize-3072",
	"tpmstate-opt-lock",
	"tpmstate-dir-backend-opt-backup",
	"tpmstate-dir-backend-opt-fsync",
}

// Unsupported lists the features of swtpm 0.7.1 (and later) that nkp-swtpm does not
// advertise because it does not do them: --print-capabilities is swtpm's list without
// these, in swtpm's order (TestPrintShapeAsSwtpm compares with the installed swtpm).
var Unsupported = []string{
	"tpm-1.2", "cmdarg-chroot", "rsa-keysize-4096", "cmdarg-profile", "cmdarg-print-profiles",
	"profile-opt-remove-disabled", "cmdarg-print-info", "cmdarg-pcap", "systemd-notify",
}

// Capabilities is the JSON object of --print-capabilities, shaped like swtpm's.
type Capabilities struct {
	Type     string   `json:"type"`
	Features []string `json:"features"`
	Version  string   `json:"version"`
}

// PrintCapabilities writes the --print-capabilities line to w exactly as swtpm 0.7.1
// lays it out (scripts match that text, not only its JSON):
// { "type": "swtpm", "features": [ "tpm-2.0", ... ], "version": "0.1.0" } and a newline.
func PrintCapabilities(w io.Writer) error {
	if _, err := io.WriteString(w, formatCapabilities(Features, Version)); err != nil {
		return fmt.Errorf("print capabilities: %w", err)
	}
	return nil
}

// formatCapabilities lays out a --print-capabilities line as swtpm 0.7.1's
// capabilities_print_json does.
func formatCapabilities(features []string, version string) string {
	var b strings.Builder
	b.WriteString(`{ "type": "swtpm", "features": [ `)
	for i, f := range features {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Quote(f))
	}
	fmt.Fprintf(&b, " ], \"version\": %s }\n", strconv.Quote(version))
	return b.String()
}

// StateEntry is one state blob in the --print-states output.
type StateEntry struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// PrintStates writes the --print-states JSON to w exactly as swtpm 0.7.1 does
// (SWTPM_NVRAM_PrintJson), without a newline at the end:
// { "type": "swtpm", "states": [ {"name": "permall", "size": 1315}, ... ] }, and
// { "type": "swtpm", "states": [] } when there are none.
func PrintStates(w io.Writer, states []StateEntry) error {
	var b strings.Builder
	b.WriteString(`{ "type": "swtpm", "states": [`)
	for i, s := range states {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, ` {"name": %s, "size": %d}`, strconv.Quote(s.Name), s.Size)
	}
	if len(states) > 0 {
		b.WriteString(" ")
	}
	b.WriteString("] }")
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("print states: %w", err)
	}
	return nil
}
