package vtpm

import "testing"

// TestGuestCrash checks which destination consoles TestQEMUMigration may retry: only a
// guest crash (kernel panic, Go fault at a wild PC), never a TPM failure the agent
// reports, nor a Go panic of the agent's own code.
func TestGuestCrash(t *testing.T) {
	tests := []struct {
		name    string
		console string
		want    string
	}{
		{"clean loop", "NKP-GUEST loop=1 pcr0=ab pcr16=cd nv=x\nNKP-GUEST loop=2 pcr0=ab pcr16=cd nv=x\n", ""},
		{"kernel panic in the timer interrupt",
			"[    7.1] RIP: 0010:0x0\n[    7.2] Kernel panic - not syncing: Fatal exception in interrupt\n",
			"[    7.2] Kernel panic - not syncing: Fatal exception in interrupt"},
		{"kernel panic, CRLF", "[ 1.0] Kernel panic - not syncing: Attempted to kill init!\r\n",
			"[ 1.0] Kernel panic - not syncing: Attempted to kill init!"},
		{"agent at a wild PC (measured, swtpm to swtpm)",
			"NKP-GUEST loop=3 pcr0=ab\nSIGSEGV: segmentation violation\nPC=0x7 m=0 sigcode=1 addr=0x7\n",
			"SIGSEGV: segmentation violation"},
		{"bus error", "SIGBUS: bus error\nPC=0x4012 m=0\n", "SIGBUS: bus error"},
		{"TPM failure reported by the agent", "NKP-GUEST error=nvread:TPM_RC_FAILURE\nNKP-GUEST done=fail\n", ""},
		{"Go nil dereference in the agent's code",
			"panic: runtime error: invalid memory address or nil pointer dereference\n[signal SIGSEGV: segmentation violation code=0x1 addr=0x0 pc=0x4a1b2c]\n", ""},
		{"Go panic from a short TPM answer", "panic: runtime error: index out of range [4] with length 2\n", ""},
		{"empty console", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := guestCrash([]byte(tt.console)); got != tt.want {
				t.Errorf("guestCrash(%q) = %q, want %q", tt.console, got, tt.want)
			}
		})
	}
}
