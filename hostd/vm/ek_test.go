package vm

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
