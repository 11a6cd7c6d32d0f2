package hostd_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/test/e2e"
)

type vm struct{ name, uuid, keyID string }

func newVM(name string) vm { return vm{name, kdk.NewKeyID(), kdk.NewKeyID()} }

// TestHost: join with a TPM (the simulator), prepare/start/release through the real hook
// and nkp-swtpm, refusals, rotation, renewal, the provider down across a hostd restart,
// revocation, and another TPM that cannot unwrap the cache.
func TestHost(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl")
	ctx := context.Background()
	p := startProvider(t)
	tpm := newHostTPM(t)
	h := newHost(t, p, tpm)
	d := h.start()
	if err := d.Sync(ctx); err != nil {
		t.Fatalf("first sync: %v\n%s", err, h.logs.String())
	}
	st := h.status()
	if len(st.KDKs) != 1 || !st.KDKs[0].Primary || st.ProviderID == "" || !st.TPMBound || !st.ProviderOnline {
		t.Fatalf("status after join = %+v", st)
	}
	// Steady polling asks with the key set it holds: no key leaves the provider and no
	// audit record is written while nothing changed.
	releases := func() int { return strings.Count(p.mustCtl(t, "", "audit", "--json"), `"kind":"release"`) }
	before := releases()
	for range 3 {
		if err := d.Sync(ctx); err != nil {
			t.Fatalf("repeated sync: %v", err)
		}
	}
	if after := releases(); after != before {
		t.Errorf("three syncs with an unchanged key set wrote %d audited releases, want none", after-before)
	}
	if code, body := h.api("/readyz"); code != 200 {
		t.Fatalf("/readyz %d %s", code, body)
	}
	k1 := st.KDKs[0]
	// Only the import blob is on disk.
	blobs, _ := os.ReadDir(filepath.Join(h.state, "kdk"))
	if len(blobs) != 1 {
		t.Fatalf("KDK cache files: %v", blobs)
	}
	if fi, _ := os.Stat(filepath.Join(h.state, "host.key")); fi.Mode().Perm() != 0o600 {
		t.Errorf("host.key mode %v", fi.Mode())
	}

	a := newVM("hostd-test-a")
	xmlA := vmXML(t, h.run, a.name, a.uuid, st.ProviderID, k1.ID, k1.Version, a.keyID)
	code, stderr, took := hook(t, h.run, xmlA, a.name, "prepare", "begin", "-")
	if code != 0 {
		t.Fatalf("prepare: exit %d: %s\n%s", code, stderr, h.logs.String())
	}
	t.Logf("prepare through nkp-hook (nkp-swtpm launched): %v", took)
	// The start hook (libvirt runs it just before QEMU) waits until the vTPM serves.
	code, stderr, took = hook(t, h.run, xmlA, a.name, "start", "begin", "-")
	if code != 0 {
		t.Fatalf("start: %d %s", code, stderr)
	}
	t.Logf("start through nkp-hook (waits for nkp-swtpm): %v", took)
	st = h.status()
	if len(st.VTPMs) != 1 || st.VTPMs[0].UUID != a.uuid || st.VTPMs[0].KeyID != a.keyID {
		t.Fatalf("vTPMs after prepare and start: %+v", st.VTPMs)
	}
	sock := st.VTPMs[0].Socket
	// QEMU's part, played by swtpm_ioctl: INIT works with the key hostd derived.
	if out, err := exec.Command("swtpm_ioctl", "--unix", sock, "-i").CombinedOutput(); err != nil {
		t.Fatalf("swtpm_ioctl -i: %v %s", err, out)
	}
	// An operation this release does not know (a newer libvirt's) passes through the
	// running hostd untouched: allowed, no message, the vTPM left as it was.
	if code, stderr, _ := hook(t, h.run, xmlA, a.name, "teleport", "begin", "-"); code != 0 || stderr != "" {
		t.Errorf("unknown operation through hostd: exit %d, stderr %q; want 0 and nothing", code, stderr)
	}
	if vt := h.status().VTPMs; len(vt) != 1 || vt[0].UUID != a.uuid {
		t.Errorf("vTPMs after an unknown operation: %+v", vt)
	}
	// A hook of the last release speaks JSON frames (hookproto version 1): hostd answers it
	// in them; a binary request it cannot read is refused in the binary framing.
	for _, tc := range []struct {
		name, send string
		want       hookproto.Reply
	}{
		{"JSON request", "", hookproto.Reply{Version: hookproto.Version, Allow: true}},
		{"binary request of another version", hookproto.Magic + "\x03", hookproto.Reply{Version: hookproto.Version2, Message: "version 3"}},
	} {
		c, err := net.Dial("unix", filepath.Join(h.run, "hook.sock"))
		if err != nil {
			t.Fatal(err)
		}
		if tc.send == "" {
			err = hookproto.WriteRequest(c, hookproto.Request{Version: hookproto.Version, Domain: a.name, Op: "teleport", SubOp: "begin", Extra: "-", XML: xmlA})
		} else {
			_, err = c.Write([]byte(tc.send))
			c.(*net.UnixConn).CloseWrite()
		}
		var r hookproto.Reply
		if err == nil {
			c.SetDeadline(time.Now().Add(time.Minute))
			r, err = hookproto.ReadReplyAny(c)
		}
		c.Close()
		if err != nil || r.Version != tc.want.Version || r.Allow != tc.want.Allow || !strings.Contains(r.Message, tc.want.Message) {
			t.Errorf("%s: reply %+v, %v; want %+v", tc.name, r, err, tc.want)
		}
	}
	if !strings.Contains(h.logs.String(), "unknown hook operation teleport") {
		t.Errorf("hostd's log does not note the unknown operation:\n%s", h.logs.String())
	}
	if code, stderr, _ := hook(t, h.run, xmlA, a.name, "release", "end", "-"); code != 0 {
		t.Fatalf("release: %d %s", code, stderr)
	}
	if n := len(h.status().VTPMs); n != 0 {
		t.Fatalf("%d vTPMs after release", n)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after release: %v", err)
	}
	// A start whose vTPM is gone is refused.
	if code, stderr, _ := hook(t, h.run, xmlA, a.name, "start", "begin", "-"); code != 1 || !strings.Contains(stderr, "ended after prepare") {
		t.Errorf("start without vTPM: %d %s", code, stderr)
	}

	// Refusals: each names the VM and the key, and says what to do.
	other := kdk.NewKeyID()
	refusals := []struct {
		name, xml string
		want      []string
	}{
		{"unknown KDK version", vmXML(t, h.run, a.name, a.uuid, st.ProviderID, k1.ID, 7, a.keyID), []string{"KDK version 7", "unknown to this host", a.keyID, "provider status"}},
		{"other provider", vmXML(t, h.run, a.name, a.uuid, other, k1.ID, k1.Version, a.keyID), []string{"provider " + other, "joined to provider " + st.ProviderID, a.keyID}},
		{"KDK ID mismatch", vmXML(t, h.run, a.name, a.uuid, st.ProviderID, other, k1.Version, a.keyID), []string{"names KDK " + other, a.keyID}},
		{"TPM not nkp's socket", strings.Replace(xmlA, filepath.Join(h.run, "vtpm"), "/elsewhere", 1), []string{"not nkp's socket", "nkpctl vm protect"}},
	}
	for _, r := range refusals {
		code, stderr, _ := hook(t, h.run, r.xml, a.name, "prepare", "begin", "-")
		if code != 1 {
			t.Errorf("%s: exit %d, want 1 (%s)", r.name, code, stderr)
		}
		for _, w := range append(r.want, a.name) {
			if !strings.Contains(stderr, w) {
				t.Errorf("%s: stderr %q lacks %q", r.name, stderr, w)
			}
		}
	}
	if n := len(h.status().VTPMs); n != 0 {
		t.Errorf("%d vTPMs after refused prepares", n)
	}
	_, metrics := h.api("/metrics")
	for _, w := range []string{`nkp_hostd_hook_duration_seconds_count{op="prepare",result="allow"} 1`, `nkp_hostd_hook_duration_seconds_count{op="prepare",result="refuse"} 4`, "nkp_hostd_provider_reachable 1", "nkp_hostd_kdk_versions_cached 1", "nkp_hostd_kdk_cache_tpm_bound 1"} {
		if !strings.Contains(metrics, w) {
			t.Errorf("/metrics lacks %q", w)
		}
	}

	// Rotation: a new primary after rotate + backup; renewal of the certificate.
	p.mustCtl(t, "", "rotate")
	p.mustCtl(t, "", "backup", "--passphrase-file", writeFile(t, "nkp hostd test passphrase 42"), "--out", filepath.Join(t.TempDir(), "b2.age"))
	oldCert, _ := os.ReadFile(filepath.Join(h.state, "host.crt"))
	d.Close()
	h.renew = 100 * 365 * 24 * time.Hour // renew at the next sync
	d = h.start()
	if err := d.Sync(ctx); err != nil {
		t.Fatalf("sync after rotate: %v", err)
	}
	st = h.status()
	if len(st.KDKs) != 2 || !st.KDKs[1].Primary || st.KDKs[0].Primary {
		t.Fatalf("KDKs after rotation: %+v", st.KDKs)
	}
	newCert, _ := os.ReadFile(filepath.Join(h.state, "host.crt"))
	if bytes.Equal(oldCert, newCert) {
		t.Error("host certificate not renewed")
	}
	if err := d.Sync(ctx); err != nil { // the provider accepts the renewed certificate
		t.Fatalf("sync with the renewed certificate: %v", err)
	}
	k2 := st.KDKs[1]
	b := newVM("hostd-test-b")
	xmlB := vmXML(t, h.run, b.name, b.uuid, st.ProviderID, k2.ID, k2.Version, b.keyID)
	if code, stderr, _ := hook(t, h.run, xmlB, b.name, "prepare", "begin", "-"); code != 0 {
		t.Fatalf("prepare with KDK v2: %d %s", code, stderr)
	}
	if code, stderr, _ := hook(t, h.run, xmlB, b.name, "start", "begin", "-"); code != 0 {
		t.Fatalf("start with KDK v2: %d %s", code, stderr)
	}

	// Another rotation, no sync: a prepare naming the new version makes hostd ask the
	// provider at once instead of refusing.
	p.mustCtl(t, "", "rotate")
	p.mustCtl(t, "", "backup", "--passphrase-file", writeFile(t, "nkp hostd test passphrase 42"), "--out", filepath.Join(t.TempDir(), "b3.age"))
	var ps apiv1.Status
	if err := json.Unmarshal([]byte(p.mustCtl(t, "", "status", "--json")), &ps); err != nil {
		t.Fatal(err)
	}
	k3 := ps.KDKs[len(ps.KDKs)-1]
	c := newVM("hostd-test-c")
	xmlC := vmXML(t, h.run, c.name, c.uuid, st.ProviderID, k3.ID, k3.Version, c.keyID)
	if code, stderr, _ := hook(t, h.run, xmlC, c.name, "prepare", "begin", "-"); code != 0 {
		t.Fatalf("prepare with a KDK version rotated in since the last sync: %d %s", code, stderr)
	}
	if code, stderr, _ := hook(t, h.run, xmlC, c.name, "release", "end", "-"); code != 0 {
		t.Fatalf("release c: %d %s", code, stderr)
	}

	// Provider down, hostd killed and restarted: VMs start from the TPM-bound cache; the
	// running vTPM of b is re-adopted.
	u, _ := url.Parse(p.url)
	p.kill()
	d.Close()
	h.renew = 0
	d = h.start()
	if err := d.Sync(ctx); err == nil {
		t.Fatal("sync with the provider down succeeded")
	}
	st = h.status()
	if st.ProviderOnline || len(st.KDKs) != 3 || len(st.VTPMs) != 1 || st.VTPMs[0].UUID != b.uuid {
		t.Fatalf("status offline after restart: %+v", st)
	}
	code, stderr, _ = hook(t, h.run, xmlA, a.name, "prepare", "begin", "-")
	if code != 0 || !strings.Contains(stderr, "unreachable") {
		t.Fatalf("prepare offline: exit %d, stderr %q", code, stderr)
	}
	if code, stderr, _ := hook(t, h.run, xmlA, a.name, "start", "begin", "-"); code != 0 {
		t.Fatalf("start offline: %d %s", code, stderr)
	}
	if _, m := h.api("/metrics"); !strings.Contains(m, "nkp_hostd_provider_reachable 0") || !strings.Contains(m, "nkp_hostd_vtpms_running 2") {
		t.Errorf("offline metrics:\n%s", m)
	}
	if !strings.Contains(h.logs.String(), "the provider is unreachable") {
		t.Error("no warning logged while offline")
	}
	for _, v := range []struct {
		vm  vm
		xml string
	}{{a, xmlA}, {b, xmlB}} {
		if code, stderr, _ := hook(t, h.run, v.xml, v.vm.name, "release", "end", "-"); code != 0 {
			t.Fatalf("release %s: %d %s", v.vm.name, code, stderr)
		}
	}

	// Revocation: the provider comes back (same address) and says this host is revoked.
	p.serve(t, u.Host)
	p.mustCtl(t, "", "revoke", st.HostID)
	d.Sync(ctx)
	st = h.status()
	if st.Revoked == nil || len(st.KDKs) != 0 {
		t.Fatalf("status after revocation: %+v", st)
	}
	if ents, _ := os.ReadDir(filepath.Join(h.state, "kdk")); len(ents) != 0 {
		t.Errorf("KDK blobs left after revocation: %v", ents)
	}
	code, stderr, _ = hook(t, h.run, xmlB, b.name, "prepare", "begin", "-")
	if code != 1 || !strings.Contains(stderr, "revoked") || !strings.Contains(stderr, b.keyID) {
		t.Errorf("prepare on a revoked host: %d %q", code, stderr)
	}
	if code, _ := h.api("/readyz"); code != 503 {
		t.Errorf("/readyz on a revoked host: %d", code)
	}
	d.Close()
}

// TestForeignTPM: a KDK cache made for one TPM, with hostd started on another TPM (the
// blob copied to another host): starts are refused with a sentence saying the TPM cannot
// unwrap it.
func TestForeignTPM(t *testing.T) {
	ctx := context.Background()
	p := startProvider(t)
	tpm := newHostTPM(t)
	h := newHost(t, p, tpm)
	d := h.start()
	if err := d.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	st := h.status()
	p.kill()
	d.Close()
	tpm.sim.Close()
	other := newHostTPM(t) // fresh seeds: another TPM
	h.tpm = other
	d = h.start()
	a := newVM("hostd-test-foreign")
	k := st.KDKs[0]
	code, stderr, _ := hook(t, h.run, vmXML(t, h.run, a.name, a.uuid, st.ProviderID, k.ID, k.Version, a.keyID), a.name, "prepare", "begin", "-")
	if code != 1 || !strings.Contains(stderr, "cannot unwrap") || !strings.Contains(stderr, a.keyID) || !strings.Contains(stderr, a.name) {
		t.Errorf("prepare with another TPM: %d %q", code, stderr)
	}
	if vs := h.status().KDKs; len(vs) != 1 || vs[0].Err == "" {
		t.Errorf("status with another TPM: %+v", vs)
	}
}

// TestNoTPM: a host without a TPM keeps its KDK in memory only: nothing on disk, and a
// restart while the provider is down cannot start protected VMs.
func TestNoTPM(t *testing.T) {
	ctx := context.Background()
	p := startProvider(t)
	h := newHost(t, p, nil)
	// libvirtd unreachable: hooks are answered all the same (hostd never asks libvirt while
	// answering one), the VM operations say why they cannot run.
	h.libvirt = "qemu+unix:///system?socket=" + filepath.Join(t.TempDir(), "no-libvirt-sock")
	d := h.start()
	if code, body := h.api("/v1/vms"); code != 503 || !strings.Contains(body, "libvirt") {
		t.Errorf("/v1/vms without libvirt: %d %s", code, body)
	}
	if err := d.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	st := h.status()
	if st.TPMBound || len(st.KDKs) != 1 {
		t.Fatalf("status: %+v", st)
	}
	if ents, _ := os.ReadDir(filepath.Join(h.state, "kdk")); len(ents) != 0 {
		t.Errorf("memory-only host wrote %v", ents)
	}
	a := newVM("hostd-test-notpm")
	xml := vmXML(t, h.run, a.name, a.uuid, st.ProviderID, st.KDKs[0].ID, st.KDKs[0].Version, a.keyID)
	if code, stderr, _ := hook(t, h.run, xml, a.name, "prepare", "begin", "-"); code != 0 {
		t.Fatalf("prepare: %d %s", code, stderr)
	}
	if code, stderr, _ := hook(t, h.run, xml, a.name, "release", "end", "-"); code != 0 {
		t.Fatalf("release: %d %s", code, stderr)
	}
	p.kill()
	d.Close()
	d = h.start()
	d.Sync(ctx)
	code, stderr, _ := hook(t, h.run, xml, a.name, "prepare", "begin", "-")
	if code != 1 || !strings.Contains(stderr, "no TPM") || !strings.Contains(stderr, "memory only") {
		t.Errorf("prepare after a restart without provider: %d %q", code, stderr)
	}
}
