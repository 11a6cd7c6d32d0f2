package libvirtns

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestUplinkSameSubnetTwice: two uplinks asking for the same subnet (the same test run
// twice at once on one machine) get different ones, and each namespace connects to a
// server on its own Gateway (with one subnet on two veths, the replies went to the
// other one and the connection hung: hostd's join timed out on the provider).
func TestUplinkSameSubnetTwice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip(8)")
	}
	ctx := context.Background()
	var hosts []*Host
	for i := range 2 {
		b := make([]byte, 4)
		rand.Read(b)
		ns := "nkpe2e-uplink-" + hex.EncodeToString(b)
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v %s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() }) // its veth goes with it
		h := &Host{Name: fmt.Sprintf("uplink%d", i), NetNS: ns}
		if err := Uplink(ctx, h, 200); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	if hosts[0].Gateway == hosts[1].Gateway {
		t.Fatalf("both uplinks on gateway %s", hosts[0].Gateway)
	}
	for _, h := range hosts {
		ln, err := net.Listen("tcp", h.Gateway+":0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("hello\n"))
				c.Close()
			}
		}()
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		out, err := exec.CommandContext(cctx, "ip", "netns", "exec", h.NetNS, "bash", "-c", "read l < /dev/tcp/"+strings.Replace(ln.Addr().String(), ":", "/", 1)+" && echo $l").CombinedOutput()
		cancel()
		if err != nil || strings.TrimSpace(string(out)) != "hello" {
			t.Errorf("%s to its gateway %s: %v %q", h.Name, ln.Addr(), err, out)
		}
	}
}

// TestPath maps paths inside a Host to where they are outside, for the libvirt
// directories, the caller's private ones, and everything else.
func TestPath(t *testing.T) {
	h := &Host{Dir: "/w", cfg: Config{Private: []string{"/run/nkp", "/var/lib/nkp"}}}
	tests := []struct{ in, want string }{
		{"/run/libvirt/libvirt-sock", "/w/run-libvirt/libvirt-sock"},
		{"/etc/libvirt/hooks/qemu.d/nkp", "/w/etc-libvirt/hooks/qemu.d/nkp"},
		{"/var/lib/libvirt", "/w/lib-libvirt"},
		{"/run/nkp/hook.sock", "/w/private/run_nkp/hook.sock"},
		{"/var/lib/nkp/hostd/host.json", "/w/private/var_lib_nkp/hostd/host.json"},
		{"/run/nkpx", "/run/nkpx"},
		{"/tmp/x", "/tmp/x"},
	}
	for _, tt := range tests {
		if got := h.Path(tt.in); got != tt.want {
			t.Errorf("Path(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestStartRefusesBadConfig checks the configuration errors that come before anything is
// created: they name the value and what is wanted.
func TestStartRefusesBadConfig(t *testing.T) {
	tests := []struct {
		cfg  Config
		want string
	}{
		{Config{Name: ""}, "want 1..6 characters"},
		{Config{Name: "toolong"}, "want 1..6 characters"},
		{Config{Name: "A"}, "want 1..6 characters"},
		{Config{Name: "a", Private: []string{"run/nkp"}}, "clean absolute path"},
		{Config{Name: "a", Private: []string{"/"}}, "clean absolute path"},
		{Config{Name: "a", Private: []string{"/run/../nkp"}}, "clean absolute path"},
	}
	for _, tt := range tests {
		h, err := Start(context.Background(), tt.cfg)
		if err == nil {
			h.Close()
			t.Errorf("Start(%+v) succeeded, want an error with %q", tt.cfg, tt.want)
			continue
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Start(%+v): %v, want %q", tt.cfg, err, tt.want)
		}
	}
}

// TestHostnameResolves: inside a Host with an uplink (a default route), its hostname
// resolves from /etc/hosts at once. libvirtd resolves it for every QEMU it starts; before
// hostsFile the query went to the machine's resolver through the uplink and every
// `virsh start` waited 10 s for its timeouts.
func TestHostnameResolves(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, append(slices.Clone(Tools), "getent")...)
	ctx := context.Background()
	h, err := Start(ctx, Config{Name: "rslv"})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := Uplink(ctx, h, 202); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	t0 := time.Now()
	out, err := h.Command(cctx, "getent", "ahostsv4", h.Name).CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "127.0.1.1 ") {
		t.Fatalf("getent ahostsv4 %s inside the Host after %v: %v %q, want 127.0.1.1 from its /etc/hosts", h.Name, time.Since(t0), err, out)
	}
}

// TestHostsFile: the Host's /etc/hosts keeps the machine's entries and adds its name.
func TestHostsFile(t *testing.T) {
	machine, _ := os.ReadFile("/etc/hosts")
	got := string(hostsFile("abc1"))
	if !strings.HasPrefix(got, string(machine)) || !strings.HasSuffix(got, "\n127.0.1.1 abc1\n") {
		t.Errorf("hostsFile(abc1) = %q, want the machine's /etc/hosts (%q) then 127.0.1.1 abc1", got, machine)
	}
}
