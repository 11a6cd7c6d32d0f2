package libvirtns

import (
	"context"
	"strings"
	"testing"
)

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
