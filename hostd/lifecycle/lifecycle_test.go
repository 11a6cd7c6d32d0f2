package lifecycle

import "testing"

func TestDecide(t *testing.T) {
	tests := []struct {
		name string
		in   Hook
		want Plan
	}{
		{"prepare", Hook{Op: "prepare", SubOp: "begin", HasVTPM: true}, Plan{Check: true, Start: true}},
		{"prepare, stale vTPM", Hook{Op: "prepare", HasVTPM: true, Running: true}, Plan{Stop: true, Check: true, Start: true, Note: "a vTPM from an earlier run was still running at prepare: stopped"}},
		{"migrate in", Hook{Op: "migrate", HasVTPM: true}, Plan{Check: true}},
		{"restore", Hook{Op: "restore", HasVTPM: true}, Plan{Check: true}},
		{"start, vTPM up", Hook{Op: "start", HasVTPM: true, Running: true}, Plan{}},
		{"start, vTPM gone", Hook{Op: "start", HasVTPM: true}, Plan{Refuse: NotRunning}},
		{"started, vTPM up", Hook{Op: "started", HasVTPM: true, Running: true}, Plan{}},
		{"started, vTPM gone", Hook{Op: "started", HasVTPM: true}, Plan{Note: "the vTPM ended before QEMU reported started"}},
		{"stopped", Hook{Op: "stopped", HasVTPM: true, Running: true}, Plan{Stop: true}},
		{"stopped, already ended", Hook{Op: "stopped", HasVTPM: true}, Plan{}},
		{"release", Hook{Op: "release", HasVTPM: true, Running: true}, Plan{Stop: true}},
		{"release, already ended", Hook{Op: "release", HasVTPM: true}, Plan{}},
		{"reconnect, vTPM up", Hook{Op: "reconnect", HasVTPM: true, Running: true}, Plan{}},
		{"reconnect, vTPM gone", Hook{Op: "reconnect", HasVTPM: true}, Plan{Note: "libvirtd reconnected to a running protected VM whose vTPM is not running: the guest has lost its TPM until it is restarted"}},
		{"attach", Hook{Op: "attach", HasVTPM: true, Running: true}, Plan{}},
		{"unknown op", Hook{Op: "teleport", HasVTPM: true}, Plan{Note: "unknown hook operation teleport: allowed"}},
		{"no vTPM, prepare", Hook{Op: "prepare"}, Plan{}},
		{"no vTPM, release of a leftover", Hook{Op: "release", Running: true}, Plan{Stop: true}},
		{"no vTPM, stopped", Hook{Op: "stopped"}, Plan{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Decide(tt.in); got != tt.want {
				t.Errorf("Decide(%+v) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func TestReconcile(t *testing.T) {
	stopMissed := Plan{Stop: true, Note: "vTPM of a domain that is not running: stopped (a release hook was missed)"}
	tests := []struct {
		name string
		in   Domain
		want Plan
	}{
		{"running with vTPM", Domain{Known: true, Active: true, HasVTPM: true, Running: true}, Plan{}},
		{"shut off, vTPM left", Domain{Known: true, HasVTPM: true, Running: true}, stopMissed},
		{"undefined, vTPM left", Domain{Running: true}, stopMissed},
		{"running without vTPM", Domain{Known: true, Active: true, HasVTPM: true}, Plan{Note: "protected domain runs without its vTPM"}},
		{"shut off, nothing", Domain{Known: true, HasVTPM: true}, Plan{}},
		{"unprotected running", Domain{Known: true, Active: true}, Plan{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Reconcile(tt.in); got != tt.want {
				t.Errorf("Reconcile(%+v) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}
