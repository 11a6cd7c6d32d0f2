package cli

import (
	"encoding/json"
	"fmt"
	"io"
)

// Version is nkp-swtpm's version, printed by --version and in --print-capabilities.
const Version = "0.1.0"

// Features lists the swtpm capability strings nkp-swtpm really supports, in swtpm's
// order. libvirt 9.0 looks for cmdarg-pwd-fd and cmdarg-migration; swtpm_setup for
// cmdarg-pwd-fd, cmdarg-key-fd, tpmstate-opt-lock and the rsa-keysize-* entries.
// cmdarg-seccomp: --seccomp action=kill|log|none installs package swtpm/seccomp's
// filter (default kill, as swtpm). Not listed on purpose: tpm-1.2 (TPM 2.0 only),
// cmdarg-chroot, nvram-backend-file, the profile options, cmdarg-pcap and systemd-notify.
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
	"rsa-keysize-1024",
	"rsa-keysize-2048",
	"rsa-keysize-3072",
	"tpmstate-opt-lock",
	"tpmstate-dir-backend-opt-backup",
	"tpmstate-dir-backend-opt-fsync",
}

// Capabilities is the JSON object of --print-capabilities, shaped like swtpm's.
type Capabilities struct {
	Type     string   `json:"type"`
	Features []string `json:"features"`
	Version  string   `json:"version"`
}

// PrintCapabilities writes the --print-capabilities JSON line to w.
func PrintCapabilities(w io.Writer) error {
	b, err := json.Marshal(Capabilities{Type: "swtpm", Features: Features, Version: Version})
	if err != nil {
		return fmt.Errorf("print capabilities: %w", err)
	}
	if _, err := fmt.Fprintf(w, "%s\n", b); err != nil {
		return fmt.Errorf("print capabilities: %w", err)
	}
	return nil
}

// StateEntry is one state blob in the --print-states output.
type StateEntry struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// PrintStates writes the --print-states JSON line to w, shaped like swtpm's:
// {"type": "swtpm", "states": [{"name": "permall", "size": N}, ...]}.
func PrintStates(w io.Writer, states []StateEntry) error {
	if states == nil {
		states = []StateEntry{}
	}
	b, err := json.Marshal(struct {
		Type   string       `json:"type"`
		States []StateEntry `json:"states"`
	}{"swtpm", states})
	if err != nil {
		return fmt.Errorf("print states: %w", err)
	}
	if _, err := fmt.Fprintf(w, "%s\n", b); err != nil {
		return fmt.Errorf("print states: %w", err)
	}
	return nil
}
