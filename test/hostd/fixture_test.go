package hostd

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/libvirtns"
)

// TestProviderFromHosts checks the fixture the hostd tests stand on: a provider serving
// on host A's uplink address answers an admin's `nkpctl provider status` run inside
// host A and inside host B (through B's own uplink), with a certificate valid for that
// address, and stops and comes back on the same address.
func TestProviderFromHosts(t *testing.T) {
	requireHosts(t)
	hostA, hostB := newHost(t, "pa", nil), newHost(t, "pb", nil)
	uplink(t, hostA, 51)
	uplink(t, hostB, 52)
	p := startProvider(t, hostA.Gateway)
	for _, h := range []struct {
		name string
		host *libvirtns.Host
	}{{"A", hostA}, {"B", hostB}} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		cmd := h.host.Command(ctx, p.nkpctl, "provider", "--dir", p.dir, "status", "--provider", p.url)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		cancel()
		if err != nil {
			t.Errorf("nkpctl provider status inside host %s: %v\n%s", h.name, err, out.String())
		} else if !strings.Contains(strings.ToLower(out.String()), "active") {
			t.Errorf("nkpctl provider status inside host %s: no Active state after the backup:\n%s", h.name, out.String())
		}
	}
	url := p.url
	p.stop(t)
	p.start(t)
	if p.url != url {
		t.Errorf("the provider came back on %s, want %s", p.url, url)
	}
}
