package vmcli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

// fakeHostd answers vmapi's paths with canned replies and records the requests.
func fakeHostd(t *testing.T) (string, *[]string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "hostd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	vm := vmapi.VM{Domain: "vm1", UUID: "5b0c6a1e-8f3d-4c2b-9a7e-1d2f3a4b5c6d", Protected: true, ProviderID: "prov-a", Running: true, TPM: "ok",
		Objects: []vmapi.Object{{Name: "vtpm", KeyID: "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71", KDKID: "k", KDKVersion: 1, Primary: false}}}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, v any) { json.NewEncoder(w).Encode(v) }
	orphan := vmapi.VM{Domain: "0c9a4e0e-2f53-4b8e-a1c5-6d7e8f9a0b1c", UUID: "0c9a4e0e-2f53-4b8e-a1c5-6d7e8f9a0b1c", Problems: []string{"libvirt defines no domain 0c9a4e0e-2f53-4b8e-a1c5-6d7e8f9a0b1c on this host"}}
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) { reply(w, vmapi.List{VMs: []vmapi.VM{vm, orphan}}) })
	mux.HandleFunc("GET /v1/vms/{d}", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("d") != "vm1" {
			w.WriteHeader(404)
			reply(w, vmapi.Error{Error: `vm "` + r.PathValue("d") + `": no such domain: check the name with virsh list --all`, Code: vmapi.CodeNotFound})
			return
		}
		reply(w, vm)
	})
	mux.HandleFunc("POST /v1/vms/{d}/{op}", func(w http.ResponseWriter, r *http.Request) {
		var body bytes.Buffer
		body.ReadFrom(r.Body)
		seen = append(seen, r.PathValue("op")+" "+r.PathValue("d")+" "+strings.TrimSpace(body.String()))
		if r.PathValue("op") == "forget" && !strings.Contains(body.String(), `"confirm":true`) {
			w.WriteHeader(400)
			reply(w, vmapi.Error{Error: "vm " + r.PathValue("d") + ": not confirmed: forget destroys ...", Code: vmapi.CodeConfirm})
			return
		}
		if r.PathValue("op") == "forget" && strings.Contains(body.String(), `"local_only":true`) {
			reply(w, vmapi.Forgotten{UUID: vm.UUID, Domain: "vm1", Note: "local only", LocalOnly: true,
				LeftInCatalog: []vmapi.CatalogObject{{Name: "vtpm", KeyID: "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71", KDKVersion: 1}, {Name: "disk:vda", KeyID: "9e2d"}}})
			return
		}
		v := vm
		v.Note = "done"
		if strings.Contains(r.Header.Get("Accept"), vmapi.ContentTypeNDJSON) {
			w.Header().Set("Content-Type", vmapi.ContentTypeNDJSON)
			for _, p := range []vmapi.Progress{{Disk: "vda", Phase: "convert", Size: 8 << 20}, {Disk: "vda", Phase: "convert", Done: 0.05}, {Disk: "vda", Phase: "convert", Done: 0.55},
				{Disk: "vda", Phase: "verify"}, {Disk: "vda", Phase: "done", Done: 1}} {
				reply(w, vmapi.Event{Progress: &p})
			}
			reply(w, vmapi.Event{VM: &v})
			return
		}
		reply(w, v)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock, &seen
}

func run(t *testing.T, sock string, args ...string) (string, error) {
	t.Helper()
	out, _, err := run2(t, sock, false, args...)
	return out, err
}

// run2 returns stdout and stderr (progress), with stderr a terminal or not.
func run2(t *testing.T, sock string, tty bool, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := newCommand(&out, &errb, tty)
	cmd.SetArgs(append([]string{"--socket", sock}, args...))
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	err := cmd.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

func TestCommands(t *testing.T) {
	sock, seen := fakeHostd(t)
	tests := []struct {
		args    []string
		want    []string
		wantErr string
		request string
	}{
		{args: []string{"status", "vm1"}, want: []string{"vm1 (5b0c6a1e-8f3d-4c2b-9a7e-1d2f3a4b5c6d): protected, keys from provider prov-a, running, TPM ok", "key 3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71  KDK version 1 (not primary: nkpctl vm rekey vm1)"}},
		{args: []string{"status"}, want: []string{"DOMAIN", "vm1", "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71", "1 (not primary)",
			"0c9a4e0e-2f53-4b8e-a1c5-6d7e8f9a0b1c: problem: libvirt defines no domain 0c9a4e0e-2f53-4b8e-a1c5-6d7e8f9a0b1c on this host"}},
		{args: []string{"status", "--json", "vm1"}, want: []string{`"key_id": "3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71"`, `"tpm": "ok"`}},
		{args: []string{"status", "nope"}, wantErr: `vm "nope": no such domain: check the name with virsh list --all`},
		{args: []string{"protect", "vm1"}, want: []string{"vm1: done"}, request: `protect vm1 {"disks":"all"}`},
		{args: []string{"rekey", "vm1"}, want: []string{"vm1: done"}, request: "rekey vm1 {}"},
		{args: []string{"rekey", "--deep", "vm1"}, want: []string{"vm1: done"}, request: `rekey vm1 {"deep":true}`},
		{args: []string{"protect", "--disks", "vda,vdb", "--remove-original", "--allow-double-encryption", "vm1"}, want: []string{"vm1: done"},
			request: `protect vm1 {"disks":"vda,vdb","remove_original":true,"allow_double_encryption":true}`},
		{args: []string{"protect", "--disks", "none", "vm1"}, want: []string{"vm1: done"}, request: `protect vm1 {"disks":"none"}`},
		{args: []string{"protect", "--finalize", "vm1"}, want: []string{"vm1: done"}, request: `finalize vm1`},
		{args: []string{"protect", "--json", "vm1"}, want: []string{`"note": "done"`}, request: `protect vm1 {"disks":"all"}`},
		{args: []string{"protect", "--disks", "vda;rm", "vm1"}, wantErr: `--disks "vda;rm": want all, none, or target devs`},
		{args: []string{"protect", "--finalize", "--disks", "vda", "vm1"}, wantErr: "--finalize removes the kept original disk files and takes no other option"},
		{args: []string{"unprotect", "vm1"}, want: []string{"vm1: done"}, request: `unprotect vm1 {"tpm":"keep"}`},
		{args: []string{"unprotect", "--tpm", "none", "vm1"}, want: []string{"vm1: done"}, request: `unprotect vm1 {"tpm":"none"}`},
		{args: []string{"unprotect", "--tpm", "maybe", "vm1"}, wantErr: `--tpm "maybe": want "keep"`},
		{args: []string{"protect"}, wantErr: "vm protect needs one DOMAIN, a name or UUID as virsh list --all shows them (got 0 arguments)"},
		{args: []string{"rekey", "a", "b"}, wantErr: "needs one DOMAIN"},
		{args: []string{"forget", "--yes", "vm1"}, want: []string{"vm1 (5b0c6a1e-8f3d-4c2b-9a7e-1d2f3a4b5c6d): forgotten: done"}, request: `forget vm1 {"confirm":true}`},
		{args: []string{"forget", "--yes", "--json", "vm1"}, want: []string{`"note": "done"`, `"unregistered": null`}, request: `forget vm1 {"confirm":true}`},
		{args: []string{"forget", "--yes", "--local-only", "vm1"}, request: `forget vm1 {"confirm":true,"local_only":true}`, want: []string{
			"vm1 (5b0c6a1e-8f3d-4c2b-9a7e-1d2f3a4b5c6d): forgotten: local only",
			"catalog: left    vtpm       key 3f1c8a52-5d4b-4a7e-9c1e-2b6f0d9e8a71  KDK version 1 (local only: an administrator removes it)",
			"catalog: left    disk:vda   key 9e2d  KDK version unknown"}},
		{args: []string{"forget", "--local-only", "vm1"}, wantErr: "leaves its objects in the provider's catalog for an administrator to remove"},
		{args: []string{"forget", "vm1"}, wantErr: "run it again with --yes once you are sure the VM is gone for good"},
		{args: []string{"forget", "--json", "vm1"}, wantErr: "nothing was changed"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			n := len(*seen)
			out, err := run(t, sock, tt.args...)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				if len(*seen) != n {
					t.Fatalf("a refused command reached hostd: %v", (*seen)[n:])
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			if tt.request != "" && (len(*seen) != n+1 || strings.TrimSpace((*seen)[n]) != strings.TrimSpace(tt.request)) {
				t.Fatalf("requests %q, want %q", (*seen)[n:], tt.request)
			}
		})
	}
	if _, err := run(t, filepath.Join(t.TempDir(), "gone.sock"), "status"); err == nil || !strings.Contains(err.Error(), "is nkp-hostd running?") {
		t.Fatalf("no hostd: %v", err)
	}
	// --json: a failure is a JSON object with hostd's code on stdout too.
	for _, tt := range []struct {
		sock string
		args []string
		code string
	}{
		{sock, []string{"status", "--json", "nope"}, vmapi.CodeNotFound},
		{filepath.Join(t.TempDir(), "gone.sock"), []string{"status", "--json"}, vmapi.CodeNoHostd},
		{filepath.Join(t.TempDir(), "gone.sock"), []string{"protect", "--json", "vm1"}, vmapi.CodeNoHostd},
		{sock, []string{"forget", "--json", "vm1"}, vmapi.CodeConfirm},
	} {
		out, err := run(t, tt.sock, tt.args...)
		var e vmapi.Error
		if err == nil || json.Unmarshal([]byte(out), &e) != nil || e.Code != tt.code || e.Error != err.Error() {
			t.Errorf("%v: stdout %q, error %v; want a JSON error with code %s", tt.args, out, err, tt.code)
		}
	}
}

// TestForgetAsks: without --yes on a terminal, forget first lets hostd refuse what it
// would refuse anyway (unconfirmed), then asks; only "yes" sends the confirmed request.
func TestForgetAsks(t *testing.T) {
	sock, seen := fakeHostd(t)
	for _, tt := range []struct {
		answer  string
		wantErr string
		sent    []string
	}{
		{"yes\n", "", []string{`forget vm1 {"confirm":false}`, `forget vm1 {"confirm":true}`}},
		{"no\n", "not confirmed: nothing was changed", []string{`forget vm1 {"confirm":false}`}},
		{"", "not confirmed", []string{`forget vm1 {"confirm":false}`}},
	} {
		t.Run(strings.TrimSpace(tt.answer), func(t *testing.T) {
			n := len(*seen)
			var out, errb bytes.Buffer
			cmd := newCommandIn(strings.NewReader(tt.answer), &out, &errb, false)
			cmd.SetArgs([]string{"--socket", sock, "forget", "vm1"})
			cmd.SilenceErrors, cmd.SilenceUsage = true, true
			err := cmd.ExecuteContext(context.Background())
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("error %v, want %q", err, tt.wantErr)
			}
			if !strings.Contains(errb.String(), "Type yes to go on") || !strings.Contains(errb.String(), "sealed secrets") {
				t.Errorf("prompt %q does not ask or say what is lost", errb.String())
			}
			if got := (*seen)[n:]; strings.Join(got, "|") != strings.Join(tt.sent, "|") {
				t.Fatalf("requests %q, want %q", got, tt.sent)
			}
		})
	}
}

// TestProgress checks the progress hostd streams: plain lines per phase and per 10% when
// standard error is not a terminal, a bar when it is; the result on stdout either way.
func TestProgress(t *testing.T) {
	sock, _ := fakeHostd(t)
	out, errs, err := run2(t, sock, false, "protect", "vm1")
	if err != nil || !strings.Contains(out, "vm1: done") {
		t.Fatalf("protect: %v\n%s", err, out)
	}
	want := "disk vda (8 MiB): converting 0%\ndisk vda: converting 55%\ndisk vda: verifying 0%\ndisk vda: done 100%\n"
	if errs != want {
		t.Fatalf("plain progress:\n%q\nwant\n%q", errs, want)
	}
	out, errs, err = run2(t, sock, true, "unprotect", "vm1")
	if err != nil || !strings.Contains(out, "vm1: done") || !strings.Contains(errs, "disk vda: verifying") || !strings.Contains(errs, "100%") {
		t.Fatalf("bar: %v\nstdout %s\nstderr %q", err, out, errs)
	}
}

func TestProgressWait(t *testing.T) {
	for _, tty := range []bool{false, true} {
		var errb bytes.Buffer
		c := &cli{stderr: &errb, tty: tty}
		p := c.progress()
		p.show(vmapi.Progress{Phase: vmapi.PhaseWait, Note: "protect of big-vm"})
		p.end()
		if want := "waiting: nkp-hostd runs one VM operation at a time, and protect of big-vm is running; this one starts when it ends\n"; errb.String() != want {
			t.Errorf("tty %v: %q, want %q", tty, errb.String(), want)
		}
	}
}

func TestDescribeDisks(t *testing.T) {
	yes := true
	var out bytes.Buffer
	c := &cli{stdout: &out}
	c.describe(vmapi.VM{Domain: "vm1", UUID: "u", Protected: true, Running: true, Disks: []vmapi.Disk{
		{Target: "vda", File: "/v/a.nkp-1.luks", Protected: true, KeyID: "K", KDKVersion: 2, Primary: true, OpenedEncrypted: &yes, Originals: []string{"/v/a.img"},
			LUKS: &vmapi.LUKS{Cipher: "aes-256-xts", IVGen: "plain64", Hash: "sha256", Iters: 1000, ActiveSlots: 1}},
		{Target: "sda", Note: "skipped: a cdrom"},
	}})
	for _, w := range []string{"disk vda   /v/a.nkp-1.luks  key K  KDK version 2 (primary)", "LUKS aes-256-xts, ivgen plain64, hash sha256, 1000 PBKDF iterations, 1 active keyslot(s)",
		"QEMU opened it encrypted", "original kept: /v/a.img (nkpctl vm protect --finalize vm1 removes it)", "disk sda   - (skipped: a cdrom)"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("lacks %q:\n%s", w, out.String())
		}
	}
}
