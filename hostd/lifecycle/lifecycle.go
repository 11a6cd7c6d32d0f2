// Package lifecycle is hostd's decision logic for a protected VM's vTPM, kept pure: the
// libvirt hook phase (or a libvirt lifecycle event) and what hostd knows about the VM go
// in, a Plan comes out, and the caller (hostd) does the I/O — checks keys, starts or stops
// nkp-swtpm, answers the hook. Every case is in the tables of lifecycle_test.go.
//
// Importers: hostd. Standard library and hooks/hookproto only.
package lifecycle

import "github.com/nkp-dev/nkp/hooks/hookproto"

// Hook is a libvirt qemu hook call as hostd sees it.
type Hook struct {
	Op, SubOp string
	// HasVTPM: the domain XML carries nkp metadata with a vTPM object.
	HasVTPM bool
	// Running: the supervisor has a live nkp-swtpm for this VM.
	Running bool
}

// Plan is what to do, in this order: Stop, Check, Start; then answer. Refuse (a reason
// code, not the sentence: the caller words it with the VM's names) refuses the hook.
type Plan struct {
	Stop   bool // stop and reap the VM's nkp-swtpm (stale from an earlier run, or the VM ended)
	Check  bool // check that the keys are available: provider, KDK version, TPM unwrap
	Start  bool // derive the vTPM key and start nkp-swtpm (implies Check)
	Refuse Reason
	// Note: something to log (the hook is still answered as the fields above say).
	Note string
}

// Reason says why a hook is refused; None allows.
type Reason int

// Reasons.
const (
	None       Reason = iota
	NotRunning        // QEMU is about to start but the vTPM that prepare started is gone
)

// Decide plans the answer to one hook call.
func Decide(h Hook) Plan {
	if !h.HasVTPM {
		// nkp metadata without a vTPM (disks only): nothing for the supervisor, but a
		// vTPM left over from before an unprotect is stopped when the VM ends.
		switch h.Op {
		case hookproto.OpStopped, hookproto.OpRelease:
			return Plan{Stop: h.Running}
		}
		return Plan{}
	}
	switch h.Op {
	case hookproto.OpPrepare:
		// A vTPM still running at prepare is stale (QEMU is not running yet): its state
		// lock would make the new one fail. Stop it, then start afresh.
		p := Plan{Start: true, Check: true, Stop: h.Running}
		if h.Running {
			p.Note = "a vTPM from an earlier run was still running at prepare: stopped"
		}
		return p
	case hookproto.OpMigrate, hookproto.OpRestore:
		// On the destination or before a restore: prepare follows and starts the vTPM;
		// refuse now already if the keys are not there, before libvirt does any work.
		return Plan{Check: true}
	case hookproto.OpStart:
		if !h.Running {
			return Plan{Refuse: NotRunning}
		}
		return Plan{}
	case hookproto.OpStarted:
		if !h.Running {
			return Plan{Note: "the vTPM ended before QEMU reported started"}
		}
		return Plan{}
	case hookproto.OpStopped, hookproto.OpRelease:
		return Plan{Stop: h.Running}
	case hookproto.OpReconnect, hookproto.OpAttach:
		if !h.Running {
			return Plan{Note: "libvirtd reconnected to a running protected VM whose vTPM is not running: the guest has lost its TPM until it is restarted"}
		}
		return Plan{}
	}
	return Plan{Note: "unknown hook operation " + h.Op + ": allowed"}
}

// Domain is a libvirt domain state as hostd's event loop and start-up reconcile see it.
type Domain struct {
	Active  bool // libvirt says the domain runs (running, paused, ...)
	HasVTPM bool // its XML carries nkp metadata with a vTPM
	Running bool // the supervisor has its nkp-swtpm
	Known   bool // libvirt knows the domain at all
}

// Reconcile plans what to do about one VM after a lifecycle event or at start-up: stop a
// vTPM whose domain is not running (a missed release hook), and note a running
// protected domain without its vTPM (nothing can give a running guest its TPM back).
func Reconcile(d Domain) Plan {
	switch {
	case d.Running && (!d.Known || !d.Active):
		return Plan{Stop: true, Note: "vTPM of a domain that is not running: stopped (a release hook was missed)"}
	case d.Known && d.Active && d.HasVTPM && !d.Running:
		return Plan{Note: "protected domain runs without its vTPM"}
	}
	return Plan{}
}
