package vm

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/test/e2e"
)

// tpmProc is a TPM server (swtpm or nkp-swtpm) on TCP ports, driven with tpm2-tools.
type tpmProc struct {
	cmd  *exec.Cmd
	port int
	out  bytes.Buffer
}

// freePorts returns a port P with P+1 free too (tpm2-tools' swtpm TCTI finds the
// control channel at P+1).
func freePorts(t *testing.T) int {
	t.Helper()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := ln.Addr().(*net.TCPAddr).Port
		ln2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+1))
		ln.Close()
		if err == nil {
			ln2.Close()
			return p
		}
	}
	t.Fatal("no two consecutive free ports")
	return 0
}

func startTPM(t *testing.T, bin, dir string, key []byte) *tpmProc {
	t.Helper()
	p := &tpmProc{port: freePorts(t)}
	ctrl := p.port + 1
	args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir + ",mode=0600",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", p.port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", ctrl),
		"--flags", "not-need-init,startup-clear"}
	p.cmd = exec.Command(bin, args...)
	if key != nil {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.Write(key)
		w.Close()
		defer r.Close()
		p.cmd.ExtraFiles = []*os.File{r}
		p.cmd.Args = append(p.cmd.Args, "--key", "fd=3,format=binary,mode=aes-256-cbc")
	}
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.port))
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			p.cmd.Process.Kill()
			t.Fatalf("%s does not listen on %d: %v\n%s", bin, p.port, err, p.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return p
}

// tool runs a tpm2-tools command against the TPM.
func (p *tpmProc) tool(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", p.port))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s\nserver:\n%s", name, args, err, out, p.out.String())
	}
	return string(out)
}

// stop shuts the TPM down cleanly (TPM2_Shutdown, then the process ends), as QEMU does.
func (p *tpmProc) stop(t *testing.T) {
	t.Helper()
	p.tool(t, "tpm2_shutdown")
	p.cmd.Process.Signal(os.Interrupt)
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		t.Fatalf("TPM server did not end on SIGINT\n%s", p.out.String())
	}
}

// TestAdoptedTPMKeepsEKAndNV: a libvirt swtpm state made by swtpm_setup gets an NV
// index written through the real swtpm; after protect adopts it, the real nkp-swtpm
// started on the new state directory with the derived key shows the same EK and NV
// value; after rekey too.
func TestAdoptedTPMKeepsEKAndNV(t *testing.T) {
	for _, tool := range []string{"swtpm", "tpm2_readpublic", "tpm2_nvread"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("NKP_E2E") == "required" {
				t.Fatalf("%s not on PATH and NKP_E2E=required", tool)
			}
			t.Skipf("%s not on PATH", tool)
		}
	}
	ctx := context.Background()
	e := newEnv(t)
	e.define(t, "ek1", uuid1, "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>")
	libvirtDir := filepath.Join(e.m.cfg.SwtpmRoot, uuid1, "tpm2")
	swtpmSetup(t, libvirtDir, nil)

	sw := startTPM(t, "swtpm", libvirtDir, nil)
	ek := sw.tool(t, "tpm2_readpublic", "-c", "0x81010001")
	sw.tool(t, "tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
	in := filepath.Join(t.TempDir(), "nv")
	os.WriteFile(in, []byte("nkp-nv-1"), 0o600)
	sw.tool(t, "tpm2_nvwrite", "0x1500016", "-C", "o", "-i", in)
	sw.stop(t)

	if _, err := e.m.Protect(ctx, "ek1"); err != nil {
		t.Fatal(err)
	}
	nkpSwtpm := e2e.BuildBinary(t, "github.com/nkp-dev/nkp/cmd/nkp-swtpm")
	check := func(stage string) {
		t.Helper()
		o, _ := e.lv.domain(t, uuid1).Metadata.Object(domxml.ObjectVTPM)
		key := vtpmKeyBytes(t, uuid1, o)
		p := startTPM(t, nkpSwtpm, StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID), key)
		clear(key)
		if got := p.tool(t, "tpm2_readpublic", "-c", "0x81010001"); got != ek {
			t.Errorf("%s: EK differs:\n%s\nwant\n%s", stage, got, ek)
		}
		out := filepath.Join(t.TempDir(), "nv-out")
		p.tool(t, "tpm2_nvread", "0x1500016", "-C", "o", "-s", "8", "-o", out)
		if b, _ := os.ReadFile(out); string(b) != "nkp-nv-1" {
			t.Errorf("%s: NV value %q, want %q", stage, b, "nkp-nv-1")
		}
		p.stop(t)
	}
	check("after adoption")
	e.keys.primary, e.keys.known = 2, 2
	if _, err := e.m.Rekey(ctx, "ek1"); err != nil {
		t.Fatal(err)
	}
	check("after rekey")
	if !strings.Contains(ek, "rsa") {
		t.Fatalf("tpm2_readpublic output does not look like an RSA EK:\n%s", ek)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	e2e.Cleanup()
	os.Exit(code)
}

// TestManufacturedTPM: protect of a domain whose libvirt swtpm never ran manufactures
// the new vTPM with the real swtpm_setup driving the real nkp-swtpm, as the vTPM user
// (tss, who owns swtpm_localca's CA): the state, read by nkp-swtpm with the derived key,
// holds the EK certificates and the platform certificate, written and locked, and only
// the PCR banks of the domain's <active_pcr_banks>.
func TestManufacturedTPM(t *testing.T) {
	e2e.Require(t, "swtpm_setup", "swtpm_localca", "tpm2_nvreadpublic", "tpm2_getcap", "tpm2_nvread")
	e2e.RequireRoot(t)
	tss, err := user.Lookup("tss")
	if err != nil {
		t.Skipf("no tss user: %v", err)
	}
	uid, _ := strconv.Atoi(tss.Uid)
	gid, _ := strconv.Atoi(tss.Gid)
	nkpSwtpm := e2e.BuildBinary(t, "github.com/nkp-dev/nkp/cmd/nkp-swtpm")
	for _, d := range []string{filepath.Dir(nkpSwtpm)} {
		os.Chmod(d, 0o711) // the vTPM user runs it
	}
	ctx := context.Background()
	e := newEnv(t)
	for d := e.m.cfg.VTPMDir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o711) // t.TempDir's directories are 0700: tss must reach its staging directory
	}
	e.m.cfg.VTPMOwner = &Owner{UID: uid, GID: gid}
	e.m.cfg.Setup = &SwtpmSetup{VTPM: nkpSwtpm}
	e.define(t, "mf2", uuid1, "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><active_pcr_banks><sha256/><sha384/></active_pcr_banks></backend></tpm>")
	start := time.Now()
	v, err := e.m.Protect(ctx, "mf2")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("protect with swtpm_setup took %v; note %q", time.Since(start).Round(time.Millisecond), v.Note)
	if !strings.HasPrefix(v.Note, "new vTPM manufactured by swtpm_setup") || !strings.Contains(v.Note, "sha256,sha384") {
		t.Errorf("note %q", v.Note)
	}
	o, _ := e.lv.domain(t, uuid1).Metadata.Object(domxml.ObjectVTPM)
	dir := StateDir(e.m.cfg.VTPMDir, uuid1, o.KeyID)
	if ents, _ := os.ReadDir(filepath.Dir(dir)); len(ents) != 1 {
		t.Errorf("left beside the state directory: %v", ents)
	}
	if fi, err := os.Stat(filepath.Join(dir, "tpm2-00.permall")); err != nil || int(fi.Sys().(*syscall.Stat_t).Uid) != uid || fi.Mode().Perm() != 0o600 {
		t.Errorf("state file: %v, %v; want tss's, 0600", fi, err)
	}
	key := vtpmKeyBytes(t, uuid1, o)
	p := startTPM(t, nkpSwtpm, dir, key)
	clear(key)
	defer p.stop(t)
	nv := strings.ToLower(p.tool(t, "tpm2_nvreadpublic"))
	for _, idx := range []string{"0x1c00002", "0x1c00016", "0x1c08000"} {
		i := strings.Index(nv, idx+":")
		if i < 0 {
			t.Errorf("NV index %s missing; tpm2_nvreadpublic:\n%s", idx, nv)
			continue
		}
		entry := nv[i:]
		if j := strings.Index(entry[1:], "\n0x"); j >= 0 {
			entry = entry[:j+1]
		}
		for _, attr := range []string{"written", "writelocked", "platformcreate"} {
			if !strings.Contains(entry, attr) {
				t.Errorf("NV index %s lacks attribute %s:\n%s", idx, attr, entry)
			}
		}
	}
	cert := filepath.Join(t.TempDir(), "ek.der")
	p.tool(t, "tpm2_nvread", "0x1c00002", "-C", "o", "-o", cert)
	if der, err := os.ReadFile(cert); err != nil || len(der) < 300 || der[0] != 0x30 {
		t.Errorf("RSA EK certificate: %d bytes, %v; want a DER certificate", len(der), err)
	}
	pcrs := p.tool(t, "tpm2_getcap", "pcrs")
	for bank, want := range map[string]bool{"sha1": false, "sha256": true, "sha384": true, "sha512": false} {
		if got := strings.Contains(pcrs, bank+": [ 0"); got != want {
			t.Errorf("bank %s active = %v, want %v; tpm2_getcap pcrs:\n%s", bank, got, want, pcrs)
		}
	}
}
