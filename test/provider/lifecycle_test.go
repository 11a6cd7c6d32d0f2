package provider_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestLifecycle walks one provider through its life on bbolt: init, refusal before backup,
// backup, enrollment, release, catalog, rotation, retirement, audit, restore into an
// empty directory (the same host keeps working against it), restore over a non-empty one.
func TestLifecycle(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	dir := b.initProvider(t)
	for _, f := range []string{"root.key", "provider.db", "admin.key", "admin.crt"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v, mode %v, want 0600", f, err, fi.Mode().Perm())
		}
	}
	s := b.serve(t, dir)
	var st apiv1.Status
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "NotBackedUp" || len(st.KDKs) != 1 || st.KDKs[0].Version != 1 || !st.KDKs[0].Primary {
		t.Fatalf("status after init = %+v", st)
	}

	h := b.mustJoin(t, s, "kvm-01")
	_, err := h.c.Release(ctx)
	if !client.IsCode(err, apiv1.CodeNotBackedUp) || !strings.Contains(strings.ToLower(err.Error()), "backup") {
		t.Fatalf("release before backup: %v, want %s with a sentence saying to take a backup", err, apiv1.CodeNotBackedUp)
	}

	pass := writeFile(t, filepath.Join(t.TempDir(), "pass"), "correct horse battery staple\n")
	archive := filepath.Join(t.TempDir(), "backup.age")
	b.mustCtl(t, dir, s.url, "", "backup", "--passphrase-file", pass, "--out", archive)
	if fi, err := os.Stat(archive); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("archive %v, mode %v, want 0600", err, fi.Mode().Perm())
	}
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "Active" || st.LastBackup.IsZero() {
		t.Fatalf("status after backup = %+v", st)
	}

	rel, err := h.c.Release(ctx)
	if err != nil || len(rel.KDKs) != 1 || len(rel.KDKs[0].Bare) != 32 || rel.KDKs[0].ID != st.KDKs[0].ID {
		t.Fatalf("release after backup = %+v, %v", rel, err)
	}
	kdk1 := rel.KDKs[0]
	vm := "6f1d7c52-8a4b-4f0e-9a55-0c9a3b8e2d11"
	for _, name := range []string{"vtpm", "disk:vda"} {
		if err := h.c.RegisterObject(ctx, apiv1.Object{VMUUID: vm, Name: name, KeyID: newUUID(t), KDKID: kdk1.ID}); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}
	var objs []apiv1.Object
	b.ctlJSON(t, dir, s.url, &objs, "objects", "--vm", vm)
	if len(objs) != 2 {
		t.Fatalf("objects of %s = %+v", vm, objs)
	}
	if err := h.c.RegisterObject(ctx, apiv1.Object{VMUUID: vm, Name: "disk:vdb", KeyID: newUUID(t), KDKID: kdk1.ID}); err != nil {
		t.Fatal(err)
	}
	if err := h.c.UnregisterObject(ctx, vm, "disk:vdb"); err != nil {
		t.Fatalf("unregister disk:vdb: %v", err)
	}
	b.ctlJSON(t, dir, s.url, &objs, "objects", "--vm", vm)
	if len(objs) != 2 {
		t.Fatalf("objects of %s after unregistering one = %+v", vm, objs)
	}

	var v2 apiv1.KDKVersion
	b.ctlJSON(t, dir, s.url, &v2, "rotate")
	if v2.Version != 2 || !v2.Primary {
		t.Fatalf("rotate = %+v", v2)
	}
	b.mustCtl(t, dir, s.url, "", "backup", "--passphrase-file", pass, "--out", archive)
	rel, err = h.c.Release(ctx)
	if err != nil || len(rel.KDKs) != 2 {
		t.Fatalf("release after rotate = %+v, %v; want both versions", rel, err)
	}
	b.ctlJSON(t, dir, s.url, &objs, "objects", "--kdk-version", "1")
	if len(objs) != 2 {
		t.Fatalf("objects of KDK v1 = %+v", objs)
	}
	if _, err := b.ctl(t, dir, s.url, "", "retire", "1"); err == nil || !strings.Contains(err.Error(), apiv1.CodeInUse) {
		t.Fatalf("retire v1 while in use: %v", err)
	}

	b.mustCtl(t, dir, s.url, "", "audit", "verify")
	var recs []apiv1.AuditRecord
	b.ctlJSON(t, dir, s.url, &recs, "audit", "-n", "0")
	kinds := map[string]bool{}
	for _, r := range recs {
		kinds[r.Kind] = true
	}
	for _, k := range []string{"init", "backup", "token", "enroll", "release", "rotate"} {
		if !kinds[k] {
			t.Errorf("audit log lacks a %q record (has %v)", k, kinds)
		}
	}
	if strings.Contains(s.Logs(), b64(kdk1.Bare)) {
		t.Fatal("the provider's log holds a KDK")
	}
	s.stop(t)

	// Restore into an empty directory: new root key, same CA, hosts and KDKs.
	dir2 := filepath.Join(t.TempDir(), "restored")
	b.mustCtl(t, dir2, "", "", "restore", "--in", archive, "--passphrase-file", pass)
	s2 := b.serve(t, dir2)
	rel2, err := h.clientFor(t, s2.url).Release(ctx)
	if err != nil || len(rel2.KDKs) != 2 {
		t.Fatalf("enrolled host against the restored provider: %+v, %v", rel2, err)
	}
	for _, k := range rel2.KDKs {
		if k.ID == kdk1.ID && string(k.Bare) != string(kdk1.Bare) {
			t.Fatal("restored provider releases another KDK v1")
		}
	}
	s2.stop(t)
	if _, err := b.ctl(t, dir2, "", "", "restore", "--in", archive, "--passphrase-file", pass); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("restore over a non-empty provider: %v, want a refusal", err)
	}
	b.mustCtl(t, dir2, "", "", "restore", "--in", archive, "--passphrase-file", pass, "--force")
}

// TestTokens: a token works once, an expired token and a reused one are refused.
func TestTokens(t *testing.T) {
	b := build(t)
	s := b.serve(t, b.initProvider(t))
	tok := b.token(t, s, "10m")
	if _, err := join(t, s.url, tok, "kvm-a", nil); err != nil {
		t.Fatalf("first use: %v", err)
	}
	if _, err := join(t, s.url, tok, "kvm-b", nil); !client.IsCode(err, apiv1.CodeTokenUsed) {
		t.Fatalf("reused token: %v, want %s", err, apiv1.CodeTokenUsed)
	}
	short := b.token(t, s, "1s")
	e2e.WaitFor(t, 30*time.Second, "the token's expiry", func() bool { return time.Now().After(short.Expires.Add(time.Second)) })
	if _, err := join(t, s.url, short, "kvm-c", nil); !client.IsCode(err, apiv1.CodeTokenExpired) {
		t.Fatalf("expired token: %v, want %s", err, apiv1.CodeTokenExpired)
	}
	if _, err := join(t, s.url, apiv1.Token{Secret: "forged.secret", CAHash: tok.CAHash}, "kvm-d", nil); !client.IsCode(err, apiv1.CodeTokenInvalid) {
		t.Fatalf("forged token: %v, want %s", err, apiv1.CodeTokenInvalid)
	}
}

// TestClientCertificates: no certificate and a certificate from another provider's CA
// are refused; a revoked host is refused at once.
func TestClientCertificates(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	dirA, s := b.running(t)
	b.backUp(t, dirA, s.url)
	h := b.mustJoin(t, s, "kvm-01")
	if _, err := h.c.Release(ctx); err != nil {
		t.Fatalf("release: %v", err)
	}

	// The admin credentials of another provider, pointed at this one's URL. nkpctl pins the
	// other CA, so present them through a client that trusts this provider's CA instead.
	dirB := b.initProvider(t)
	if _, err := b.ctl(t, dirB, s.url, "", "status"); err == nil || !strings.Contains(err.Error(), "does not chain") {
		t.Fatalf("nkpctl with another provider's CA: %v, want the server refused", err)
	}
	_, err := b.ctl(t, dirA, s.url, "", "status", "--cert", filepath.Join(dirB, "admin.crt"), "--key", filepath.Join(dirB, "admin.key"), "--ca", filepath.Join(dirA, "ca.crt"))
	if err == nil || !strings.Contains(err.Error(), apiv1.CodeUnauthenticated) {
		t.Fatalf("admin certificate from another CA: %v, want %s", err, apiv1.CodeUnauthenticated)
	}
	for _, path := range []string{apiv1.PathStatus, apiv1.PathHostKDKs} {
		status, body := rawGet(t, s.url+path, filepath.Join(dirA, "ca.crt"))
		if status != 401 || !strings.Contains(body, apiv1.CodeUnauthenticated) {
			t.Fatalf("GET %s without a client certificate = %d %s, want 401 %s", path, status, body, apiv1.CodeUnauthenticated)
		}
	}

	b.mustCtl(t, dirA, s.url, "", "revoke", h.id)
	if _, err := h.c.Release(ctx); !client.IsCode(err, apiv1.CodeHostRevoked) {
		t.Fatalf("revoked host: %v, want %s", err, apiv1.CodeHostRevoked)
	}
	var hosts []apiv1.Host
	b.ctlJSON(t, dirA, s.url, &hosts, "hosts")
	if len(hosts) != 1 || !hosts[0].Revoked {
		t.Fatalf("hosts after revoke = %+v", hosts)
	}
}

// TestForeignStore: a store file from another provider is refused at start with a
// sentence naming the root key, and nothing is changed in it.
func TestForeignStore(t *testing.T) {
	b := build(t)
	dirA := b.initProvider(t)
	dirB := b.initProvider(t)
	foreign, err := os.ReadFile(filepath.Join(dirB, "provider.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dirA, "provider.db"), foreign, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(b.provider, "serve", "--dir", dirA, "--listen", "127.0.0.1:0", "--log-format", "text")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(strings.ToLower(string(out)), "root key") {
		t.Fatalf("serve over another provider's store: %v\n%s\nwant a refusal naming the root key", err, out)
	}
	after, err := os.ReadFile(filepath.Join(dirA, "provider.db"))
	if err != nil || !bytes.Equal(after, foreign) {
		t.Fatalf("the foreign store was modified by the refused start (%v)", err)
	}
}
