package hostd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// hookFiles returns the hooks of a host with nkp's hook installed as qemu.d/nkp.
func hookFiles(t *testing.T) map[string][]byte {
	t.Helper()
	b, err := os.ReadFile(e2e.BuildBinary(t, "./cmd/nkp-hook"))
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{"nkp": b}
}

// TestHookWithoutHostd runs nkp's hook in a host where no nkp-hostd runs: libvirt starts
// domains without nkp metadata as if the hook were not there, refuses a protected one
// with a sentence naming the VM, its key and what to do, and the hook program itself
// copes with garbage, unknown operations and wrong arguments.
func TestHookWithoutHostd(t *testing.T) {
	a := requireHosts(t)
	h := newHost(t, "hk", hookFiles(t))
	f := newVMFiles(t, a)

	t.Run("unprotected domain starts", func(t *testing.T) {
		d := newDomain(t, f, "plain", loopConfig("x", "y"), "")
		define(t, h, d, f.dir)
		virsh(t, h, "start", d.Name)
		if s := state(h, d.Name); s != "running" {
			t.Errorf("state %q after virsh start, want running", s)
		}
		virsh(t, h, "destroy", d.Name)
	})

	t.Run("protected domain refused", func(t *testing.T) {
		d := newDomain(t, f, "prot", loopConfig("x", "y"), "")
		d.UUID = uuid.NewString()
		p, keyID := protectXML(t, d, f.dir, uuid.NewString(), uuid.NewString(), 1)
		virsh(t, h, "define", p)
		t.Cleanup(func() { h.Virsh(context.Background(), "undefine", d.Name) })
		out, err := h.Virsh(context.Background(), "start", d.Name)
		if err == nil {
			t.Fatalf("virsh start of a protected domain succeeded without nkp-hostd:\n%s", out)
		}
		for _, want := range []string{d.Name, keyID, "nkp-hostd", "start nkp-hostd"} {
			if !strings.Contains(out, want) {
				t.Errorf("virsh's error lacks %q:\n%s", want, out)
			}
		}
		if s := state(h, d.Name); s != "shut off" {
			t.Errorf("state %q after the refused start, want shut off", s)
		}
	})

	t.Run("direct calls", func(t *testing.T) {
		d := newDomain(t, f, "direct", loopConfig("x", "y"), "")
		d.UUID = uuid.NewString()
		p, keyID := protectXML(t, d, f.dir, uuid.NewString(), uuid.NewString(), 1)
		prot, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		garbage := make([]byte, 64<<10)
		rand.Read(garbage)
		tests := []struct {
			name   string
			args   []string
			stdin  []byte
			code   int
			stderr []string // substrings; nil: stderr must be empty
		}{
			{"garbage stdin", []string{d.Name, "prepare", "begin", "-"}, garbage, 0, nil},
			{"empty stdin", []string{d.Name, "prepare", "begin", "-"}, nil, 0, nil},
			{"garbage argv, plain stdin", []string{"\xff\xfe", "", ""}, []byte("<domain/>"), 0, nil},
			{"unknown operation, protected", []string{d.Name, "frobnicate", "begin", "-"}, prot, 1, []string{d.Name, keyID, "frobnicate", "start nkp-hostd"}}, // fail closed
			{"reconnect, protected", []string{d.Name, "reconnect", "begin", "-"}, prot, 0, []string{"warning", d.Name}},
			{"release, protected", []string{d.Name, "release", "end", "-"}, prot, 0, []string{"warning", d.Name}},
			{"prepare, protected", []string{d.Name, "prepare", "begin", "-"}, prot, 1, []string{d.Name, keyID, "start nkp-hostd"}},
			{"restore, protected", []string{d.Name, "restore", "begin", "-"}, prot, 1, []string{d.Name, keyID, "restored"}},
			{"migrate, protected", []string{d.Name, "migrate", "begin", "-"}, prot, 1, []string{d.Name, keyID, "migrate in"}},
			{"protected, truncated XML", []string{d.Name, "prepare", "begin", "-"}, prot[:len(prot)-30], 1, []string{d.Name, "nkp-hostd"}},
			{"protected, wrong argument count", []string{d.Name, "prepare"}, prot, 1, []string{"want the 4 arguments"}},
			{"protected, unknown flag", []string{"--bogus=1", d.Name, "prepare", "begin", "-"}, prot, 1, []string{"unknown flag --bogus"}},
		}
		for _, tt := range tests {
			code, stdout, stderr := runHook(t, h, tt.args, tt.stdin)
			if code != tt.code {
				t.Errorf("%s: exit %d, want %d; stderr: %s", tt.name, code, tt.code, stderr)
			}
			if stdout != "" {
				t.Errorf("%s: the hook wrote %q on stdout (libvirt would take it as a new domain XML)", tt.name, stdout)
			}
			if tt.stderr == nil && stderr != "" {
				t.Errorf("%s: stderr %q, want nothing", tt.name, stderr)
			}
			for _, want := range tt.stderr {
				if !strings.Contains(stderr, want) {
					t.Errorf("%s: stderr lacks %q: %s", tt.name, want, stderr)
				}
			}
		}
	})
}

// runHook runs the installed hook inside h as libvirtd would, with a bound.
func runHook(t *testing.T, h *libvirtns.Host, args []string, stdin []byte) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := h.Command(ctx, "/etc/libvirt/hooks/qemu.d/nkp", args...)
	cmd.Stdin = bytes.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("run the hook: %v", err)
	}
	return code, o.String(), e.String()
}
