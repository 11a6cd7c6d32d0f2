package hostd

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// refusedStart starts vm on h, expects libvirt to refuse it, and checks that virsh's
// error names the VM, its vTPM key ID and each of want; the domain stays shut off.
func refusedStart(t *testing.T, h *libvirtns.Host, vm *nkpVM, want ...string) {
	t.Helper()
	out, err := h.Virsh(context.Background(), "start", vm.spec.Name)
	if err == nil {
		t.Fatalf("virsh start %s succeeded, want a refusal with %q:\n%s", vm.spec.Name, want, out)
	}
	for _, w := range append([]string{vm.spec.Name, vm.prot.keyID}, want...) {
		if !strings.Contains(out, w) {
			t.Errorf("virsh's error lacks %q:\n%s", w, out)
		}
	}
	if s := state(h, vm.spec.Name); s != "shut off" {
		t.Errorf("state %q after the refused start, want shut off", s)
	}
}

// TestRefusals starts protected domains whose metadata this host cannot honour: keys from
// another provider, a KDK version it does not know, a KDK ID that does not match the
// version, and then any VM once the provider revoked the host (the policy: the cached
// KDKs are deleted and every start is refused, while running VMs keep running). Each
// refusal reaches the virsh user as a sentence naming the VM, the key and what to do.
func TestRefusals(t *testing.T) {
	a := requireHosts(t)
	bins := buildNKP(t)
	h := newHost(t, "rf", hookFiles(t))
	uplink(t, h, 62)
	p := startProvider(t, h.Gateway)
	d := joinHost(t, h, p, nil, bins, "--sync-interval", "2s")
	good := protectionFor(t, d)

	tests := []struct {
		name string
		edit func(*protection)
		want []string
	}{
		{"another provider", func(p *protection) { p.providerID = uuid.NewString() }, []string{"keys come from provider", "this host is joined to provider"}},
		{"unknown KDK version", func(p *protection) { p.kdkVersion = 99 }, []string{"KDK version 99", "unknown to this host"}},
		{"KDK ID of another version", func(p *protection) { p.kdkID = uuid.NewString() }, []string{"metadata comes from another provider or was edited"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prot := good
			prot.keyID = uuid.NewString()
			tt.edit(&prot)
			vm := newNKPVM(t, a, "refuse", prot)
			vm.define(t, h, nvRead)
			refusedStart(t, h, vm, tt.want...)
		})
	}

	t.Run("revoked host", func(t *testing.T) {
		vm := newNKPVM(t, a, "revoke", good)
		vm.define(t, h, running)
		vm.start(t, h)
		other := newNKPVM(t, a, "revoke2", protection{good.providerID, good.kdkID, good.kdkVersion, uuid.NewString()})
		other.define(t, h, nvRead)
		st := d.status(t)
		p.ctl(t, "revoke", st.HostID)
		e2e.WaitFor(t, 60*time.Second, "hostd to learn it was revoked", func() bool {
			code, b, err := d.get("/v1/host")
			return err == nil && code == 200 && strings.Contains(string(b), `"revoked"`)
		})
		refusedStart(t, h, other, "was revoked", "join it again")
		if s := state(h, vm.spec.Name); s != "running" {
			t.Errorf("the VM running at revocation: state %q, want running (policy: running VMs are kept)", s)
		}
		vm.runsOn(t)
	})
}
