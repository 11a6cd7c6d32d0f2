package provider_test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/test/etcdtest"
)

// TestEtcdTLS: against an etcd that serves https and requires client certificates,
// init/serve/restore without the TLS flags fail naming them, and with
// --etcd-cacert/--etcd-cert/--etcd-key the provider initialises, serves, backs up and
// restores (nkpctl) over TLS.
func TestEtcdTLS(t *testing.T) {
	b := build(t)
	etcd := etcdtest.New(t, etcdtest.Config{TLS: true})
	f := etcd.TLSFiles()
	eps := strings.Join(etcd.Endpoints(), ",")
	if !strings.HasPrefix(eps, "https://") {
		t.Fatalf("etcdtest TLS endpoints %q are not https", eps)
	}
	plain := []string{"--store", "etcd", "--etcd-endpoints", eps}
	caOnly := append(append([]string{}, plain...), "--etcd-cacert", f.CA)
	full := append(append([]string{}, caOnly...), "--etcd-cert", f.ClientCert, "--etcd-key", f.ClientKey)

	refusals := []struct {
		name string
		args []string
		want string
	}{
		{"no TLS flags", plain, "--etcd-cacert"},
		{"CA but no client certificate", caOnly, "--etcd-cert and --etcd-key"},
		{"certificate without key", append(append([]string{}, caOnly...), "--etcd-cert", f.ClientCert), "--etcd-key"},
	}
	for _, tc := range refusals {
		t.Run("init/"+tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "p")
			out, err := exec.Command(b.provider, append([]string{"init", "--dir", dir, "--log-format", "text"}, tc.args...)...).CombinedOutput()
			if err == nil || !strings.Contains(string(out), tc.want) {
				t.Fatalf("init %v: err %v, output %q: want a refusal naming %q", tc.args, err, out, tc.want)
			}
		})
	}

	dir := b.initProvider(t, full...)
	t.Run("serve without TLS flags", func(t *testing.T) {
		out, err := exec.Command(b.provider, append([]string{"serve", "--dir", dir, "--listen", "127.0.0.1:0", "--log-format", "text"}, plain...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "--etcd-cacert") {
			t.Fatalf("serve without TLS flags: err %v, output %q: want a refusal naming --etcd-cacert", err, out)
		}
	})
	s := b.serve(t, dir, full...)
	pass := writeFile(t, filepath.Join(t.TempDir(), "pass"), "pw: correct horse battery")
	archive := filepath.Join(t.TempDir(), "b.age")
	b.mustCtl(t, dir, s.url, "", "backup", "--passphrase-file", pass, "--out", archive)
	var st apiv1.Status
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "Active" {
		t.Fatalf("state after a backup over etcd TLS: %s", st.State)
	}
	s.stop(t)

	// nkpctl restore opens the store itself: the same flags, the same refusals.
	if _, err := b.ctl(t, dir, "", "", append([]string{"restore", "--in", archive, "--passphrase-file", pass, "--force"}, plain...)...); err == nil || !strings.Contains(err.Error(), "--etcd-cacert") {
		t.Fatalf("nkpctl restore without TLS flags: %v, want a refusal naming --etcd-cacert", err)
	}
	b.mustCtl(t, dir, "", "", append([]string{"restore", "--in", archive, "--passphrase-file", pass, "--force"}, full...)...)
	s2 := b.serve(t, dir, full...)
	b.ctlJSON(t, dir, s2.url, &st, "status")
	if st.State != "Active" || st.ProviderID == "" {
		t.Fatalf("status after restore over etcd TLS: %+v", st)
	}
}
