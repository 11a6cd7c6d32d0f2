package vmcli_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/virt"
	"github.com/nkp-dev/nkp/hostd/vm"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/test/e2e"
)

func TestMain(m *testing.M) {
	code := m.Run()
	e2e.Cleanup()
	os.Exit(code)
}

// keys is a KDK cache whose primary version the test moves.
type keys struct {
	mu      sync.Mutex
	primary int
}

func kdkID(v int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012d", v) }

func (k *keys) ProviderID() string { return "prov-e2e" }

func (k *keys) Primary(context.Context) (vm.KDK, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return vm.KDK{ID: kdkID(k.primary), Version: k.primary}, nil
}

func (k *keys) Derive(_ context.Context, v vm.KDK, purpose, vmUUID, keyID string) ([]byte, error) {
	s := sha256.Sum256([]byte(strconv.Itoa(v.Version)))
	return kdk.Derive(s[:], purpose, vmUUID, keyID)
}

type catalog struct {
	mu sync.Mutex
	m  map[string]apiv1.Object
}

func (c *catalog) RegisterObject(_ context.Context, o apiv1.Object) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[o.VMUUID+"/"+o.Name] = o
	return nil
}

func (c *catalog) UnregisterObject(_ context.Context, u, name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, u+"/"+name)
	return nil
}

// ForgetVM: this test has one host, which owns everything.
func (c *catalog) ForgetVM(_ context.Context, u string) (apiv1.ForgetResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var r apiv1.ForgetResponse
	for k, o := range c.m {
		if o.VMUUID == u {
			r.Removed = append(r.Removed, o)
			delete(c.m, k)
		}
	}
	return r, nil
}

// MoveVM: this test has one host, which owns everything.
func (c *catalog) MoveVM(context.Context, string) ([]apiv1.Object, error) { return nil, nil }

// TestNkpctlWithLibvirt runs the real nkpctl binary against hostd/vm's handler on a
// unix socket, with the real libvirtd: a domain with libvirt's own swtpm (state made by
// swtpm_setup in libvirt's directory) is protected (adopted), rekeyed and unprotected,
// and then libvirt starts it with its own swtpm on the state nkp handed back.
func TestNkpctlWithLibvirt(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root (libvirt's swtpm directory, chown to tss)")
	}
	for _, tool := range []string{"virsh", "swtpm_setup"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("NKP_E2E") == "required" {
				t.Fatalf("%s missing and NKP_E2E=required", tool)
			}
			t.Skipf("%s missing", tool)
		}
	}
	conn, err := virt.Open(context.Background(), "qemu:///system", slog.New(slog.DiscardHandler))
	if err != nil {
		if os.Getenv("NKP_E2E") == "required" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	defer conn.Close()
	tss, err := user.Lookup("tss")
	if err != nil {
		t.Skipf("user tss: %v", err)
	}
	uid, _ := strconv.Atoi(tss.Uid)
	gid, _ := strconv.Atoi(tss.Gid)

	ctx := context.Background()
	var r [4]byte
	rand.Read(r[:])
	name := "hostdvm-nkpctl-" + hex.EncodeToString(r[:])
	u := uuid.NewString()
	t.Cleanup(func() {
		exec.Command("virsh", "-c", "qemu:///system", "destroy", name).Run()
		exec.Command("virsh", "-c", "qemu:///system", "undefine", "--tpm", name).Run()
		os.RemoveAll(filepath.Join(domxml.DefaultSwtpmRoot, u))
	})
	x := `<domain type='qemu'><name>` + name + `</name><uuid>` + u + `</uuid><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os><devices><controller type='usb' model='none'/><memballoon model='none'/>
<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='vncpw-k8'/>
<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm></devices></domain>`
	if err := conn.DefineXML(ctx, []byte(x)); err != nil {
		t.Fatal(err)
	}
	// As libvirt makes them: the swtpm root and the VM's directory 0711 (swtpm runs as
	// tss and must reach in), the state directory 0700. A root made 0700 here would break
	// every libvirt-managed vTPM on the machine (TestLibvirtEmulator, adopt tests).
	libvirtDir := filepath.Join(domxml.DefaultSwtpmRoot, u, "tpm2")
	if err := os.MkdirAll(filepath.Dir(libvirtDir), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(libvirtDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", libvirtDir, "--createek", "--config", "/dev/null").CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup: %v\n%s", err, out)
	}
	orig, err := os.ReadFile(filepath.Join(libvirtDir, "tpm2-00.permall"))
	if err != nil {
		t.Fatal(err)
	}

	root := t.TempDir()
	k := &keys{primary: 1}
	cat := &catalog{m: map[string]apiv1.Object{}}
	m, err := vm.New(vm.Config{Keys: k, Libvirt: conn, Catalog: cat,
		VTPMDir: filepath.Join(root, "vtpm"), JournalDir: filepath.Join(root, "journal"), SocketDir: "/run/nkp/vtpm",
		VTPMOwner: &vm.Owner{UID: uid, GID: gid}, SwtpmOwner: &vm.Owner{UID: uid, GID: gid}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(root, "hostd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: m.Handler()}
	go srv.Serve(ln)
	defer srv.Close()

	nkpctl := e2e.BuildBinary(t, "github.com/nkp-dev/nkp/cmd/nkpctl")
	run := func(args ...string) (string, string, error) {
		cmd := exec.Command(nkpctl, append([]string{"vm", "--socket", sock}, args...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		start := time.Now()
		err := cmd.Run()
		t.Logf("nkpctl vm %s: %v", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
		return out.String(), errb.String(), err
	}
	status := func() vmapi.VM {
		t.Helper()
		out, stderr, err := run("status", "--json", name)
		if err != nil {
			t.Fatalf("status: %v\n%s", err, stderr)
		}
		var v vmapi.VM
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("status --json: %v\n%s", err, out)
		}
		return v
	}

	// A refusal: rekey before protect.
	_, stderr, err := run("rekey", name)
	if err == nil || !strings.Contains(stderr, `vm "`+name+`"`) || !strings.Contains(stderr, "nkpctl vm protect "+name) {
		t.Fatalf("rekey of an unprotected VM: %v, stderr %q", err, stderr)
	}

	out, stderr, err := run("protect", name)
	if err != nil || !strings.Contains(out, "adopted libvirt's swtpm state from "+libvirtDir) {
		t.Fatalf("protect: %v\nstdout %s\nstderr %s", err, out, stderr)
	}
	v := status()
	if !v.Protected || len(v.Objects) != 1 || v.Objects[0].KDKVersion != 1 || v.TPM != "stopped" {
		t.Fatalf("status after protect: %+v", v)
	}
	px := must(conn.DomainXML(ctx, u))
	d, _ := domxml.Parse(px)
	if tp, _ := d.TPM(); tp == nil || tp.Backend != domxml.BackendExternal || tp.Model != "tpm-tis" {
		t.Fatalf("libvirt's definition after protect: TPM %+v", tp)
	}
	// The redefinition keeps what only --security-info shows (a VNC password here).
	if !bytes.Contains(px, []byte("passwd='vncpw-k8'")) {
		t.Fatalf("the VNC password was lost by protect:\n%s", px)
	}

	k.mu.Lock()
	k.primary = 2
	k.mu.Unlock()
	if out, stderr, err := run("rekey", name); err != nil || !strings.Contains(out, "(KDK version 2)") {
		t.Fatalf("rekey: %v\n%s%s", err, out, stderr)
	}
	if v2 := status(); v2.Objects[0].KDKVersion != 2 || v2.Objects[0].KeyID == v.Objects[0].KeyID || !v2.Objects[0].Primary {
		t.Fatalf("status after rekey: %+v", v2)
	}

	if out, stderr, err := run("unprotect", name); err != nil || !strings.Contains(out, "libvirt's swtpm again") {
		t.Fatalf("unprotect: %v\n%s%s", err, out, stderr)
	}
	if v := status(); v.Protected {
		t.Fatalf("status after unprotect: %+v", v)
	}
	if len(cat.m) != 0 {
		t.Fatalf("catalog after unprotect: %v", cat.m)
	}
	back, err := os.ReadFile(filepath.Join(libvirtDir, "tpm2-00.permall"))
	if err != nil || !bytes.Equal(back, orig) {
		t.Fatalf("libvirt's state after unprotect differs from swtpm_setup's (%v)", err)
	}

	// libvirt starts the domain with its own swtpm on the state nkp gave back.
	if out, err := exec.Command("virsh", "-c", "qemu:///system", "start", name).CombinedOutput(); err != nil {
		t.Fatalf("virsh start after unprotect: %v\n%s", err, out)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		err = conn.TPMCheck(ctx, name)
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("TPM of the started domain: %v", err)
	}
	if _, stderr, err := run("protect", name); err == nil || !strings.Contains(stderr, "virsh shutdown "+name) {
		t.Fatalf("protect of a running VM: %v, stderr %q", err, stderr)
	}
	if st, err := os.ReadFile(filepath.Join(libvirtDir, "tpm2-00.permall")); err != nil || len(st) == 0 {
		t.Fatalf("libvirt's swtpm state after start: %v", err)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
