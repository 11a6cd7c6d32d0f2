package hostd_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// diskDomainXML is a TCG domain with one raw LUKS disk whose passphrase is the libvirt
// secret domxml.SecretUUID(uuid, keyID), and nkp metadata naming that disk object.
func diskDomainXML(t *testing.T, name, uuid, image, providerID, kdkID string, kdkVersion int, keyID string) string {
	t.Helper()
	base := fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='%s'>
        <encryption format='luks'><secret type='passphrase' uuid='%s'/></encryption>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`, name, uuid, image, domxml.SecretUUID(uuid, keyID))
	doc, err := domxml.SetMetadata([]byte(base), &domxml.Metadata{ProviderID: providerID, Objects: []domxml.Object{{Name: "disk:vda", KeyID: keyID, KDKID: kdkID, KDKVersion: kdkVersion}}})
	if err != nil {
		t.Fatal(err)
	}
	return string(doc)
}

// TestDiskSecrets runs hostd against a private libvirtd whose qemu hook is nkp-hook:
// hostd defines the secret of a protected disk when its domain is defined, libvirt
// creates a LUKS volume under it and starts the domain (QEMU opens the disk with it);
// after a libvirtd restart and after another process undefines it, hostd defines it
// again; a domain whose secret hostd has not defined is refused by the hook with a
// sentence naming the disk, key and KDK version, and starts on the retry; an image made
// under another key and an unknown KDK version are refused likewise.
func TestDiskSecrets(t *testing.T) {
	e2e.Require(t, append([]string{"qemu-system-x86_64", "qemu-img"}, libvirtns.Tools...)...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	p := startProvider(t)
	h := newHost(t, p, newHostTPM(t))
	hookBin := e2e.BuildBinary(t, "./cmd/nkp-hook")
	wrapper := fmt.Sprintf("#!/bin/sh\nexec %s --socket=%s --config=/dev/null \"$@\"\n", hookBin, filepath.Join(h.run, "hook.sock"))
	if err := libvirtns.RemoveStale(); err != nil {
		t.Log(err)
	}
	lv, err := libvirtns.Start(ctx, libvirtns.Config{Name: "dsec", Hooks: map[string][]byte{"nkp": []byte(wrapper)}})
	if err != nil {
		t.Fatalf("private libvirtd: %v", err)
	}
	defer lv.Close()
	virsh := func(args ...string) (string, error) { return lv.Virsh(ctx, args...) }
	mustVirsh := func(args ...string) string {
		t.Helper()
		out, err := virsh(args...)
		if err != nil {
			t.Fatalf("virsh %s: %v", strings.Join(args, " "), err)
		}
		return out
	}
	h.libvirt = lv.URI
	d := h.start()
	if err := d.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	st := h.status()
	k := st.KDKs[0]
	pool := filepath.Join(lv.Dir, "pool")
	if err := os.Mkdir(pool, 0o711); err != nil {
		t.Fatal(err)
	}
	mustVirsh("pool-create-as", "dsec", "dir", "--target", pool)
	// waitSecret polls libvirt (bounded) until secret u is listed (or, with gone, is not).
	waitSecret := func(u string, present bool, what string) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			out, err := virsh("secret-list")
			if err == nil && strings.Contains(out, u) == present {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: secret %s present=%v not reached within 60 s: %s %v\n%s", what, u, !present, out, err, h.logs.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	volume := func(name, secret string) string {
		t.Helper()
		f := filepath.Join(t.TempDir(), "vol.xml")
		os.WriteFile(f, []byte(fmt.Sprintf(`<volume><name>%s</name><capacity unit='MiB'>16</capacity>
<target><format type='raw'/><encryption format='luks'><secret type='passphrase' uuid='%s'/><cipher name='aes' size='256' mode='xts' hash='sha512'/><ivgen name='plain64' hash='sha256'/></encryption></target></volume>`, name, secret)), 0o600)
		// qemu-img's PBKDF timing fails now and then ("Unable to get accurate CPU usage";
		// qemuimg retries it, libvirt does not): SHA-512 as qemuimg.DefaultHashAlg says
		// why, and a retry.
		for try := 1; ; try++ {
			_, err := virsh("vol-create", "dsec", f)
			if err == nil {
				break
			}
			if try == 8 || !strings.Contains(err.Error(), "accurate CPU usage") {
				t.Fatalf("vol-create %s: %v", name, err)
			}
			virsh("vol-delete", "--pool", "dsec", name)
		}
		return filepath.Join(pool, name)
	}
	running := func(name string) {
		t.Helper()
		if out := mustVirsh("domstate", name); !strings.Contains(out, "running") {
			t.Fatalf("domain %s: %s", name, out)
		}
	}

	// A persistent protected domain: defined → hostd defines its secret.
	a := newVM("dsec-a")
	sa := domxml.SecretUUID(a.uuid, a.keyID)
	xa := filepath.Join(t.TempDir(), "a.xml")
	os.WriteFile(xa, []byte(diskDomainXML(t, a.name, a.uuid, filepath.Join(pool, "a.luks"), st.ProviderID, k.ID, k.Version, a.keyID)), 0o600)
	mustVirsh("define", xa)
	waitSecret(sa, true, "after define")
	if out, err := virsh("secret-get-value", sa); err == nil || !strings.Contains(err.Error(), "private") {
		t.Errorf("secret-get-value of a disk secret: %q %v; want refused as private", out, err)
	}
	if out := mustVirsh("secret-dumpxml", sa); !strings.Contains(out, "ephemeral='yes'") || !strings.Contains(out, "nkp: disk vda of VM dsec-a") || !strings.Contains(out, a.keyID) {
		t.Errorf("secret definition: %s", out)
	}
	volume("a.luks", sa) // libvirt itself makes the LUKS volume under the secret's value
	start := time.Now()
	mustVirsh("start", a.name)
	t.Logf("start of a domain with a LUKS disk (default PBKDF, TCG): %v", time.Since(start))
	running(a.name)
	mustVirsh("destroy", a.name)
	if n := h.status().DiskSecrets; n != 1 {
		t.Errorf("status: %d disk secrets, want 1", n)
	}
	if _, body := h.api("/metrics"); !strings.Contains(body, "nkp_hostd_disk_secrets_defined 1") || !strings.Contains(body, "nkp_hostd_disk_secret_reconcile_errors_total 0") {
		t.Errorf("metrics lack the disk secret figures:\n%s", grepLines(body, "disk_secret"))
	}

	// libvirtd restarts: the ephemeral secret is gone; hostd defines it again with the
	// same value (the disk opens).
	if err := lv.StopLibvirtd(); err != nil {
		t.Fatal(err)
	}
	if err := lv.StartLibvirtd(ctx); err != nil {
		t.Fatal(err)
	}
	waitSecret(sa, true, "after the libvirtd restart")
	mustVirsh("start", a.name)
	running(a.name)
	mustVirsh("destroy", a.name)
	if ents, _ := os.ReadDir(lv.Path("/etc/libvirt/secrets")); len(ents) != 0 {
		t.Errorf("the private libvirtd's /etc/libvirt/secrets holds %v", ents)
	}

	// Another process undefines it: defined again.
	mustVirsh("secret-undefine", sa)
	waitSecret(sa, true, "after virsh secret-undefine")

	// A domain hostd has not seen (a transient create, as an incoming migration): the
	// prepare hook refuses with the sentence and has the secret defined; the retry starts.
	b := newVM("dsec-b")
	sb := domxml.SecretUUID(b.uuid, b.keyID)
	xb := filepath.Join(t.TempDir(), "b.xml")
	os.WriteFile(xb, []byte(diskDomainXML(t, b.name, b.uuid, filepath.Join(pool, "b.luks"), st.ProviderID, k.ID, k.Version, b.keyID)), 0o600)
	_, err = virsh("create", xb)
	if err == nil {
		t.Fatal("virsh create of a domain whose disk secret is not defined succeeded")
	}
	for _, want := range []string{`VM "dsec-b" disk vda`, "key " + b.keyID, fmt.Sprintf("KDK v%d", k.Version), "not defined on this host yet", "virsh start dsec-b` again"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal lacks %q: %v", want, err)
		}
	}
	waitSecret(sb, true, "after the refused start")
	volume("b.luks", sb)
	mustVirsh("create", xb)
	running(b.name)
	mustVirsh("destroy", b.name)

	// An incoming migration's migrate hook (sent as libvirtd would, before the domain
	// exists here): refused with the migration's way out; the secret is defined from
	// the hook's XML, so the retry passes.
	mg := newVM("dsec-m")
	sm := domxml.SecretUUID(mg.uuid, mg.keyID)
	xm := diskDomainXML(t, mg.name, mg.uuid, filepath.Join(pool, "m.luks"), st.ProviderID, k.ID, k.Version, mg.keyID)
	code, stderr, took := hook(t, h.run, xm, mg.name, "migrate", "begin", "-")
	if code == 0 || !strings.Contains(stderr, "retry the migration") || !strings.Contains(stderr, mg.keyID) || !strings.Contains(stderr, "disk vda") {
		t.Errorf("migrate hook without the secret: %d %q", code, stderr)
	}
	t.Logf("migrate hook refused from memory in %v (nkp-hook process included)", took)
	waitSecret(sm, true, "after the migrate hook")
	for deadline := time.Now().Add(time.Minute); ; {
		code, stderr, _ = hook(t, h.run, xm, mg.name, "migrate", "begin", "-")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("migrate hook still refused a minute after the secret was defined: %q", stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// An image made under another key (a's volume, named by a domain with a key of its
	// own): hostd verifies the image when it defines the secret, and the hook refuses
	// naming disk, key and image (until then QEMU's own "Invalid password" fails it).
	w := newVM("dsec-w")
	xw := filepath.Join(t.TempDir(), "w.xml")
	os.WriteFile(xw, []byte(diskDomainXML(t, w.name, w.uuid, filepath.Join(pool, "a.luks"), st.ProviderID, k.ID, k.Version, w.keyID)), 0o600)
	mustVirsh("define", xw)
	for deadline := time.Now().Add(2 * time.Minute); ; {
		_, err = virsh("start", w.name)
		if err == nil {
			t.Fatal("a domain whose image was made under another key started")
		}
		if strings.Contains(err.Error(), "does not open under this key") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("start of a domain with another key's image, 2 minutes on: %v\n%s", err, h.logs.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, want := range []string{`VM "dsec-w" disk vda`, "key " + w.keyID, filepath.Join(pool, "a.luks")} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("wrong-key refusal lacks %q: %v", want, err)
		}
	}

	// An image swapped under a defined domain after it was verified (another VM's LUKS
	// image renamed over a's): the prepare hook sees the file changed (a stat), verifies
	// it again inline and refuses naming VM, disk, key and path, where QEMU would fail
	// with libvirt's bare "Invalid password".
	for deadline := time.Now().Add(time.Minute); ; {
		if strings.Contains(grepLines(grepLines(h.logs.String(), "disk image opens under its key"), a.keyID), filepath.Join(pool, "a.luks")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a.luks not verified under a's key within a minute:\n%s", h.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	other, err := os.ReadFile(filepath.Join(pool, "b.luks"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pool, "a.luks.swap"), other, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(pool, "a.luks.swap"), filepath.Join(pool, "a.luks")); err != nil {
		t.Fatal(err)
	}
	_, err = virsh("start", a.name)
	if err == nil {
		t.Fatal("a domain whose image was swapped for another VM's started")
	}
	for _, want := range []string{`VM "dsec-a" disk vda`, "key " + a.keyID, filepath.Join(pool, "a.luks"), "does not open under this key"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("swapped-image refusal lacks %q: %v", want, err)
		}
	}

	// A KDK version this host does not hold.
	c := newVM("dsec-c")
	xc := filepath.Join(t.TempDir(), "c.xml")
	os.WriteFile(xc, []byte(diskDomainXML(t, c.name, c.uuid, filepath.Join(pool, "a.luks"), st.ProviderID, kdk.NewKeyID(), k.Version+1, c.keyID)), 0o600)
	mustVirsh("define", xc)
	_, err = virsh("start", c.name)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("KDK version %d is unknown to this host", k.Version+1)) || !strings.Contains(err.Error(), c.keyID) {
		t.Errorf("start with an unknown KDK version: %v", err)
	}

	// Undefined domains lose their secrets.
	mustVirsh("undefine", a.name)
	waitSecret(sa, false, "after undefine")

	// Revocation: every nkp secret goes, and starts are refused saying why.
	p.mustCtl(t, "", "revoke", st.HostID)
	d.Sync(ctx)
	waitSecret(sm, false, "after the revocation")
	out := mustVirsh("secret-list")
	for _, u := range []string{sb, sm, domxml.SecretUUID(w.uuid, w.keyID)} {
		if strings.Contains(out, u) {
			t.Errorf("secret %s left after the revocation:\n%s", u, out)
		}
	}
	if _, err := virsh("start", w.name); err == nil || !strings.Contains(err.Error(), "revoked") || !strings.Contains(err.Error(), "disk vda") {
		t.Errorf("start on a revoked host: %v", err)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
