package virt

import (
	"context"
	"encoding/base64"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

func TestSecretXML(t *testing.T) {
	u := kdk.NewKeyID()
	tests := []struct {
		s       Secret
		want    string // substring of the XML, or of the error
		wantErr bool
	}{
		{Secret{UUID: u, Description: "nkp: disk vda of VM <a&b> (x), key y"}, "<description>nkp: disk vda of VM &lt;a&amp;b&gt; (x), key y</description>", false},
		{Secret{UUID: u, Description: "nkp: d"}, "<secret ephemeral='yes' private='yes'><uuid>" + u + "</uuid>", false},
		{Secret{UUID: u, Description: "disk vda"}, "does not start with", true},
		{Secret{UUID: "not-a-uuid", Description: "nkp: d"}, "libvirt secret", true},
		{Secret{UUID: u + "</uuid><usage", Description: "nkp: d"}, "libvirt secret", true},
	}
	for _, tt := range tests {
		x, err := secretXML(tt.s)
		switch {
		case tt.wantErr && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("secretXML(%+v) = %q, %v; want an error with %q", tt.s, x, err, tt.want)
		case !tt.wantErr && (err != nil || !strings.Contains(x, tt.want)):
			t.Errorf("secretXML(%+v) = %q, %v; want %q in it", tt.s, x, err, tt.want)
		}
	}
	info, err := parseSecret([]byte("<secret ephemeral='yes' private='no'>\n  <uuid>" + u + "</uuid>\n  <description>nkp: x</description>\n</secret>"))
	if err != nil || info.UUID != u || !info.Ephemeral || info.Private || info.Description != "nkp: x" {
		t.Errorf("parseSecret = %+v, %v", info, err)
	}
}

func requireLibvirt(t *testing.T) {
	t.Helper()
	e2e.RequireRoot(t)
	e2e.Require(t, "virsh")
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "list").CombinedOutput(); err != nil {
		e2e.Unavailable(t, fmt.Sprintf("libvirtd not running (run test/setup.sh): %v %s", err, out))
	}
}

// nextEvent waits for an event of kind for uuid, skipping others; it fails on an event
// in unwanted (e.g. this process's own secret events, which must not be delivered).
func nextEvent(t *testing.T, c *Conn, want EventKind, uuid string, unwanted ...EventKind) {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case ev := <-c.Events():
			for _, k := range unwanted {
				if ev.Kind == k && ev.UUID == uuid {
					t.Fatalf("unwanted event %d for %s (while waiting for %d)", k, uuid, want)
				}
			}
			if ev.Kind == want && ev.UUID == uuid {
				return
			}
		case <-deadline:
			t.Fatalf("no event %d for %s within 60 s", want, uuid)
		}
	}
}

// TestSecrets runs against the machine's libvirtd: an ephemeral private secret is
// defined, its value refused to virsh, nothing written under /etc/libvirt/secrets; other
// processes' changes arrive as events, this process's own do not.
func TestSecrets(t *testing.T) {
	requireLibvirt(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := Open(ctx, "qemu:///system", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nextEvent(t, c, Reconnected, "")
	u := kdk.NewKeyID()
	virsh := func(args ...string) (string, error) {
		out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() { virsh("secret-undefine", u) })
	value := []byte(strings.Repeat("0123456789abcdef", 4))
	if err := c.DefineSecret(ctx, Secret{UUID: u, Description: "nkp: disk vda of VM test (x), key y"}, value); err != nil {
		t.Fatal(err)
	}
	// Defined again (as after a libvirtd restart, or a repair): same UUID, no error.
	if err := c.DefineSecret(ctx, Secret{UUID: u, Description: "nkp: disk vda of VM test (x), key y"}, value); err != nil {
		t.Fatalf("defining again: %v", err)
	}
	if ok, err := c.SecretExists(ctx, u); !ok || err != nil {
		t.Errorf("SecretExists of a defined secret: %v, %v", ok, err)
	}
	list, err := c.ListSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range list {
		if !strings.HasPrefix(s.Description, SecretPrefix) {
			t.Errorf("ListSecrets returned a secret that is not nkp's: %+v", s)
		}
		if s.UUID == u {
			found = true
			if !s.Ephemeral || !s.Private {
				t.Errorf("secret %+v: want ephemeral and private", s)
			}
		}
	}
	if !found {
		t.Fatalf("ListSecrets = %+v lacks %s", list, u)
	}
	if out, err := virsh("secret-get-value", u); err == nil || !strings.Contains(out, "private") {
		t.Errorf("virsh secret-get-value of a private secret: %v %q; want a refusal", err, out)
	}
	ents, _ := os.ReadDir("/etc/libvirt/secrets")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), u) {
			t.Errorf("/etc/libvirt/secrets/%s exists: the secret reached the disk", e.Name())
		}
	}
	// Another process sets the value: one SecretChanged; this process's own define and
	// value set (above) delivered none before it.
	f := filepath.Join(t.TempDir(), "v")
	os.WriteFile(f, []byte(base64.StdEncoding.EncodeToString([]byte("other"))), 0o600)
	if out, err := virsh("secret-set-value", u, "--file", f); err != nil {
		t.Fatalf("virsh secret-set-value: %v %s", err, out)
	}
	nextEvent(t, c, SecretChanged, u, SecretUndefined)
	if out, err := virsh("secret-undefine", u); err != nil {
		t.Fatalf("virsh secret-undefine: %v %s", err, out)
	}
	nextEvent(t, c, SecretUndefined, u)
	if err := c.UndefineSecret(ctx, u); err != nil {
		t.Errorf("undefining a secret already gone: %v", err)
	}
	if ok, err := c.SecretExists(ctx, u); ok || err != nil {
		t.Errorf("SecretExists of an undefined secret: %v, %v", ok, err)
	}
	// This process's own undefine delivers no event either: define, undefine, then
	// another process's define must be the next event for u.
	if err := c.DefineSecret(ctx, Secret{UUID: u, Description: "nkp: again"}, value); err != nil {
		t.Fatal(err)
	}
	if err := c.UndefineSecret(ctx, u); err != nil {
		t.Fatal(err)
	}
	def := filepath.Join(t.TempDir(), "s.xml")
	os.WriteFile(def, []byte("<secret ephemeral='yes' private='yes'><uuid>"+u+"</uuid><description>someone else</description></secret>"), 0o600)
	if out, err := virsh("secret-define", def); err != nil {
		t.Fatalf("virsh secret-define: %v %s", err, out)
	}
	nextEvent(t, c, SecretChanged, u, SecretUndefined)
	// A non-private secret of someone else under our UUID: DefineSecret takes it over.
	virsh("secret-undefine", u)
	os.WriteFile(def, []byte("<secret ephemeral='no' private='no'><uuid>"+u+"</uuid><description>someone else</description></secret>"), 0o600)
	if out, err := virsh("secret-define", def); err != nil {
		t.Fatalf("virsh secret-define: %v %s", err, out)
	}
	if err := c.DefineSecret(ctx, Secret{UUID: u, Description: "nkp: taken over"}, value); err != nil {
		t.Fatalf("taking over a persistent public secret: %v", err)
	}
	if out, err := virsh("secret-get-value", u); err == nil {
		t.Errorf("after the takeover the value is readable: %q", out)
	}
	if _, err := os.Stat(filepath.Join("/etc/libvirt/secrets", u+".xml")); err == nil {
		t.Error("after the takeover the persistent definition is still on disk")
	}
}

// TestSecretsRestart runs a private libvirtd (test/libvirtns): secrets are gone after
// libvirtd restarts, the connection reports Disconnected then Reconnected, and nothing
// of them was ever written under the Host's /etc/libvirt/secrets.
func TestSecretsRestart(t *testing.T) {
	e2e.RequireRoot(t)
	e2e.Require(t, libvirtns.Tools...)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := libvirtns.RemoveStale(); err != nil {
		t.Log(err)
	}
	h, err := libvirtns.Start(ctx, libvirtns.Config{Name: "vsec"})
	if err != nil {
		e2e.Unavailable(t, fmt.Sprintf("private libvirtd: %v", err))
	}
	defer h.Close()
	c, err := Open(ctx, h.URI, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nextEvent(t, c, Reconnected, "")
	u := kdk.NewKeyID()
	if err := c.DefineSecret(ctx, Secret{UUID: u, Description: "nkp: restart test"}, []byte("v")); err != nil {
		t.Fatal(err)
	}
	if out, err := h.Virsh(ctx, "secret-get-value", u); err == nil {
		t.Errorf("secret-get-value answered %q", out)
	} else if !strings.Contains(err.Error(), "private") {
		t.Errorf("secret-get-value: %v; want the refusal of a private secret", err)
	}
	// What a reconcile after a restart costs: 200 disks' secrets defined (50 VMs × 4).
	start := time.Now()
	for range 200 {
		if err := c.DefineSecret(ctx, Secret{UUID: kdk.NewKeyID(), Description: "nkp: many"}, []byte(strings.Repeat("ab", 32))); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	if list, err := c.ListSecrets(ctx); err != nil || len(list) != 201 {
		t.Fatalf("ListSecrets: %d secrets, %v; want 201", len(list), err)
	}
	t.Logf("200 secrets defined in %v (%v each)", took, took/200)
	dir := h.Path("/etc/libvirt/secrets")
	if err := h.StopLibvirtd(); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, c, Disconnected, "")
	if err := h.StartLibvirtd(ctx); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, c, Reconnected, "")
	list, err := c.ListSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 0 {
		t.Errorf("after a libvirtd restart: %+v; ephemeral secrets must be gone", list)
	}
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("%s/%s: a secret reached the disk", dir, e.Name())
	}
	// The reconnected connection works for secrets (and their events) again.
	if err := c.DefineSecret(ctx, Secret{UUID: u, Description: "nkp: restart test"}, []byte("v")); err != nil {
		t.Fatalf("define after reconnect: %v", err)
	}
	if _, err := h.Virsh(ctx, "secret-undefine", u); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, c, SecretUndefined, u)
}

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	u := kdk.NewKeyID()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name    string
		setup   func() string // returns the UUID to read
		want    string
		wantErr string
	}{
		{"value", func() string {
			write(u+".base64", base64.StdEncoding.EncodeToString([]byte("pass phrase"))+"\n")
			return u
		}, "pass phrase", ""},
		{"upper-case UUID", func() string { return strings.ToUpper(u) }, "pass phrase", ""},
		{"missing", func() string { return kdk.NewKeyID() }, "", "no such file"},
		{"not base64", func() string { v := kdk.NewKeyID(); write(v+".base64", "not base64!"); return v }, "", "not base64"},
		{"empty", func() string { v := kdk.NewKeyID(); write(v+".base64", ""); return v }, "", "no value"},
		{"too large", func() string { v := kdk.NewKeyID(); write(v+".base64", strings.Repeat("A", 64<<10+4)); return v }, "", "larger than 64 KiB"},
		{"symlink", func() string {
			v := kdk.NewKeyID()
			write("target", base64.StdEncoding.EncodeToString([]byte("x")))
			os.Symlink(filepath.Join(dir, "target"), filepath.Join(dir, v+".base64"))
			return v
		}, "", "too many levels of symbolic links"},
		{"not a UUID", func() string { return "../target" }, "", "UUID"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := readSecretFile(dir, tt.setup())
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("value %q, error %v; want an error saying %q", v, err, tt.wantErr)
				}
				return
			}
			if err != nil || string(v) != tt.want {
				t.Fatalf("value %q, error %v; want %q", v, err, tt.want)
			}
		})
	}
}

// TestPrivateSecretValue: libvirt's documentation defines a vTPM's secret private; its
// value is read from libvirt's store when it is persistent, and an ephemeral one is
// refused with a sentence that says what to do.
func TestPrivateSecretValue(t *testing.T) {
	requireLibvirt(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := Open(ctx, "qemu:///system", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, ephemeral := range []string{"no", "yes"} {
		u := kdk.NewKeyID()
		def := filepath.Join(t.TempDir(), "s.xml")
		os.WriteFile(def, []byte("<secret ephemeral='"+ephemeral+"' private='yes'><uuid>"+u+"</uuid><description>vTPM test</description><usage type='vtpm'><name>nkp-test-"+u+"</name></usage></secret>"), 0o600)
		if out, err := exec.Command("virsh", "-c", "qemu:///system", "secret-define", def).CombinedOutput(); err != nil {
			t.Fatalf("virsh secret-define: %v %s", err, out)
		}
		t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "secret-undefine", u).Run() })
		vf := filepath.Join(t.TempDir(), "v")
		os.WriteFile(vf, []byte(base64.StdEncoding.EncodeToString([]byte("swtpm pass"))), 0o600)
		if out, err := exec.Command("virsh", "-c", "qemu:///system", "secret-set-value", u, "--file", vf).CombinedOutput(); err != nil {
			t.Fatalf("virsh secret-set-value: %v %s", err, out)
		}
		v, err := c.SecretValue(ctx, u)
		if ephemeral == "no" {
			if err != nil || string(v) != "swtpm pass" {
				t.Fatalf("persistent private secret: %q, %v", v, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), "private and ephemeral") || !strings.Contains(err.Error(), "private='no'") {
			t.Fatalf("ephemeral private secret: %q, %v; want a refusal saying what to do", v, err)
		}
	}
}
