package provider_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/apiv1"
)

// TestAdminRevocation: an administrator added through replica A works on both replicas
// until it is revoked through A; then both replicas refuse it at once (403, admin_revoked,
// a sentence naming it) while the other admin keeps working; the last admin cannot be
// revoked; a backup carries the revocation into a restored provider.
func TestAdminRevocation(t *testing.T) {
	b := build(t)
	p := b.replicas(t)
	dirA, dirB, a, bb := p.dirA, p.dirB, p.a, p.b

	bobDir := filepath.Join(t.TempDir(), "bob")
	b.mustCtl(t, dirA, a.url, "", "admins", "add", "bob", "--out", bobDir)
	for _, s := range []*server{a, bb} {
		if _, err := b.ctl(t, bobDir, s.url, "", "status"); err != nil {
			t.Fatalf("bob on %s before the revocation: %v", s.url, err)
		}
	}
	var admins []apiv1.Admin
	b.ctlJSON(t, dirB, bb.url, &admins, "admins")
	if len(admins) != 2 || admins[0].Name != "admin" || admins[1].Name != "bob" || admins[1].Revoked {
		t.Fatalf("admins on B = %+v, want admin and bob, live", admins)
	}
	bobSerial := admins[1].Serial

	b.mustCtl(t, dirA, a.url, "", "admins", "revoke", "bob")
	for _, s := range []*server{a, bb} {
		_, err := b.ctl(t, bobDir, s.url, "", "status")
		if err == nil || !strings.Contains(err.Error(), "HTTP 403, code "+apiv1.CodeAdminRevoked) || !strings.Contains(err.Error(), bobSerial) {
			t.Fatalf("revoked bob on %s: %v, want HTTP 403 %s naming serial %s", s.url, err, apiv1.CodeAdminRevoked, bobSerial)
		}
		if _, err := b.ctl(t, dirA, s.url, "", "status"); err != nil {
			t.Fatalf("the other admin on %s after bob's revocation: %v", s.url, err)
		}
	}
	if _, err := b.ctl(t, dirB, bb.url, "", "admins", "revoke", "admin"); err == nil || !strings.Contains(err.Error(), apiv1.CodeLastAdmin) ||
		!strings.Contains(err.Error(), "admins add") {
		t.Fatalf("revoking the last admin: %v, want %s with the way out", err, apiv1.CodeLastAdmin)
	}
	out := b.mustCtl(t, dirB, bb.url, "", "audit", "-n", "5")
	if !strings.Contains(out, "admin_revoke") || !strings.Contains(out, bobSerial) {
		t.Fatalf("audit tail has no admin_revoke record for %s:\n%s", bobSerial, out)
	}
	b.mustCtl(t, dirB, bb.url, "", "audit", "verify")

	// The revocation survives a backup and a restore.
	pass := writeFile(t, filepath.Join(t.TempDir(), "p"), "pw: correct horse battery\n")
	archive := filepath.Join(t.TempDir(), "b.age")
	b.mustCtl(t, dirA, a.url, "", "backup", "--passphrase-file", pass, "--out", archive)
	restored := filepath.Join(t.TempDir(), "restored")
	b.mustCtl(t, restored, "", "", "restore", "--in", archive, "--passphrase-file", pass)
	r := b.serve(t, restored)
	if _, err := b.ctl(t, bobDir, r.url, "", "status"); err == nil || !strings.Contains(err.Error(), apiv1.CodeAdminRevoked) {
		t.Fatalf("revoked bob on the restored provider: %v, want %s", err, apiv1.CodeAdminRevoked)
	}
	b.ctlJSON(t, restored, r.url, &admins, "admins")
	revoked := 0
	for _, ad := range admins {
		if ad.Revoked {
			revoked++
			if ad.Serial != bobSerial {
				t.Fatalf("restored admins %+v: only bob (%s) should be revoked", admins, bobSerial)
			}
		}
	}
	if revoked != 1 || len(admins) != 3 { // admin, bob, and the restore's fresh admin
		t.Fatalf("restored admins = %+v, want 3 with bob revoked", admins)
	}
}
