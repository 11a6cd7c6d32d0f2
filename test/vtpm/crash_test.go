package vtpm

import "testing"

// TestGuestCrash checks which destination consoles TestQEMUMigration may retry: only a
// guest crash (kernel oops, BUG or panic, Go fault at a wild PC), never a TPM failure the agent
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
		{"oops in the scheduler (measured, nkp-swtpm to nkp-swtpm, CI)",
			"[    2.98] BUG: unable to handle page fault for address: ffff8e49c2970000\n[    2.98] Oops: 0011 [#1] PREEMPT SMP NOPTI\n",
			"[    2.98] BUG: unable to handle page fault for address: ffff8e49c2970000"},
		{"oops trace end only", "[    2.99]  </TASK>\n[    2.99] ---[ end trace 0000000000000000 ]---\n",
			"[    2.99] ---[ end trace 0000000000000000 ]---"},
		{"general protection fault", "[ 3.1] general protection fault, probably for non-canonical address 0xdead: 0000 [#1]\n",
			"[ 3.1] general protection fault, probably for non-canonical address 0xdead: 0000 [#1]"},
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

// TestKernelSpinning checks the lockup test on QEMU 7.2's "info registers" lines: only
// ring 0, not halted, with IF clear counts as spinning.
func TestKernelSpinning(t *testing.T) {
	tests := []struct {
		name string
		regs string
		want bool
	}{
		{"kernel, interrupts off, running (measured hang)",
			"RAX=0000000000000000 RBX=0000000000aaae80\nRIP=ffffffff99a9c77b RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\nES =0000\n", true},
		{"idle kernel waiting for an interrupt (TPM wait)",
			"RIP=ffffffff9a1b2c3d RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n", false},
		{"kernel with interrupts on", "RIP=ffffffff9a1b2c3d RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n", false},
		{"user space", "RIP=00000000004846d7 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\n", false},
		{"halted with IF clear (not a spin)", "RIP=ffffffff9a1b2c3d RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n", false},
		{"no RIP line", "error: no CPU\n", false},
		{"garbage flags", "RIP=ffffffff9a1b2c3d RFL=zz CPL=0 HLT=0\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, got := kernelSpinning(tt.regs); got != tt.want {
				t.Errorf("kernelSpinning(%q) = %v, want %v", tt.regs, got, tt.want)
			}
		})
	}
}
