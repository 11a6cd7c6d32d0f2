package tpmdev_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/nkp-dev/nkp/internal/tpmdev"
	"github.com/nkp-dev/nkp/test/e2e"
)

func TestMain(m *testing.M) { e2e.Main(m) }

func TestParseSpec(t *testing.T) {
	tests := []struct {
		spec    string
		want    tpmdev.Spec
		wantErr string
	}{
		{"", tpmdev.Spec{Kind: tpmdev.KindDevice, Path: "/dev/tpmrm0"}, ""},
		{"/dev/tpm0", tpmdev.Spec{Kind: tpmdev.KindDevice, Path: "/dev/tpm0"}, ""},
		{"swtpm:path=/run/d.sock", tpmdev.Spec{Kind: tpmdev.KindSwtpm, Path: "/run/d.sock"}, ""},
		{"swtpm:path=/run/d.sock,ctrl=/run/c.sock", tpmdev.Spec{Kind: tpmdev.KindSwtpm, Path: "/run/d.sock", Ctrl: "/run/c.sock"}, ""},
		{"swtpm:ctrl=/c,path=/d", tpmdev.Spec{Kind: tpmdev.KindSwtpm, Path: "/d", Ctrl: "/c"}, ""},
		{"swtpm:/run/x", tpmdev.Spec{}, `"/run/x" is not understood`},
		{"swtpm:path=", tpmdev.Spec{}, `"path=" is not understood`},
		{"swtpm:ctrl=/c", tpmdev.Spec{}, "no path="},
		{"swtpm:path=/a,mode=0600", tpmdev.Spec{}, `"mode=0600" is not understood`},
		{"swtpm:path=/a,path=/b", tpmdev.Spec{}, `"path=/b" is not understood`},
		{"tpmrm0", tpmdev.Spec{}, "/dev/tpmrm0"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := tpmdev.ParseSpec(tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseSpec(%q) = %+v, %v; want an error containing %q", tc.spec, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseSpec(%q) = %+v, %v; want %+v", tc.spec, got, err, tc.want)
			}
		})
	}
}

func TestOpenRefusals(t *testing.T) {
	dir := t.TempDir()
	notDev := filepath.Join(dir, "file")
	if err := os.WriteFile(notDev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		spec    string
		wantErr string
	}{
		{"swtpm:path=" + filepath.Join(dir, "none.sock"), "is swtpm running"},
		{filepath.Join(dir, "missing"), "is it a TPM 2.0 device"},
		{notDev, "not a device"},
		{"relative", "want a TPM device"},
	}
	for _, tc := range tests {
		if _, err := tpmdev.Open(tc.spec); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("Open(%q): %v, want an error containing %q", tc.spec, err, tc.wantErr)
		}
	}
}

// getRandom16 is TPM2_GetRandom(16).
var getRandom16 = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16}

// useTPM checks that tpm answers a raw command through Send and go-tpm-tools' client
// through ReadWriter (storage root key, seal, unseal).
func useTPM(t *testing.T, tpm transport.TPM) {
	t.Helper()
	rsp, err := tpm.Send(getRandom16)
	if err != nil {
		t.Fatalf("GetRandom: %v", err)
	}
	if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != 0 || len(rsp) != 10+2+16 {
		t.Fatalf("GetRandom answered rc %#x with %d bytes, want 0 and 28", rc, len(rsp))
	}
	srk, err := client.StorageRootKeyECC(tpmdev.ReadWriter(tpm))
	if err != nil {
		t.Fatalf("storage root key through ReadWriter: %v", err)
	}
	defer srk.Close()
	sealed, err := srk.Seal([]byte("kdk"), client.SealOpts{})
	if err != nil {
		t.Fatalf("Seal: %v", err)
	}
	pt, err := srk.Unseal(sealed, client.UnsealOpts{})
	if err != nil || string(pt) != "kdk" {
		t.Fatalf("Unseal = %q, %v", pt, err)
	}
}

// TestSimulator: the go-tpm-tools simulator as a test TPM, and why ReadWriter exists:
// go-tpm's transport.ToReadWriter breaks go-tpm-tools' client.
func TestSimulator(t *testing.T) {
	sim, err := simulator.GetWithFixedSeedInsecure(1)
	if err != nil {
		t.Fatalf("simulator: %v", err)
	}
	tpm := transport.FromReadWriteCloser(sim)
	defer tpm.Close()
	useTPM(t, tpm)
	if _, err := client.StorageRootKeyECC(transport.ToReadWriter(tpm)); err == nil {
		t.Log("go-tpm's transport.ToReadWriter works with go-tpm-tools now; ReadWriter may go")
	}
}

// swtpmUnder starts a swtpm-compatible program (Debian's swtpm or nkp-swtpm) with a
// unix data and control socket and extra arguments, and returns the two socket paths.
func swtpmUnder(t *testing.T, bin string, extra ...string) (data, ctrl string) {
	t.Helper()
	dir := t.TempDir()
	data, ctrl = filepath.Join(dir, "data.sock"), filepath.Join(dir, "ctrl.sock")
	logPath := filepath.Join(dir, "log")
	args := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir,
		"--server", "type=unixio,path=" + data, "--ctrl", "type=unixio,path=" + ctrl,
		"--log", "file=" + logPath}, extra...)
	cmd := exec.Command(bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", bin, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			log, _ := os.ReadFile(logPath)
			t.Logf("%s stderr:\n%s\nlog:\n%s", bin, stderr.String(), log)
		}
	})
	exited := false
	e2e.WaitFor(t, 10*time.Second, bin+"'s sockets", func() bool {
		select {
		case <-done:
			exited = true
			return true
		default:
		}
		for _, p := range []string{data, ctrl} { // listening, not only bound
			c, err := net.Dial("unix", p)
			if err != nil {
				return false
			}
			c.Close()
		}
		return true
	})
	if exited {
		t.Fatalf("%s %q exited before its sockets appeared", bin, args)
	}
	return data, ctrl
}

// TestSocketTPM opens real swtpm and nkp-swtpm data sockets: powered on through the
// control socket when needed, refused with the way out when not powered on and no
// control socket is named, used as started when it was started already; a second Open
// of a running TPM neither re-initialises it nor fails.
func TestSocketTPM(t *testing.T) {
	e2e.Require(t, "swtpm")
	bins := map[string]string{"swtpm": "swtpm", "nkp-swtpm": e2e.BuildBinary(t, "./cmd/nkp-swtpm")}
	for _, name := range []string{"swtpm", "nkp-swtpm"} {
		bin := bins[name]
		t.Run(name+"/power on through ctrl", func(t *testing.T) {
			data, ctrl := swtpmUnder(t, bin)
			tpm, err := tpmdev.Open("swtpm:path=" + data + ",ctrl=" + ctrl)
			if err != nil {
				t.Fatal(err)
			}
			useTPM(t, tpm)
			// A PCR extended now must survive a second Open (no CMD_INIT, no reset).
			extend := []byte{0x80, 0x02, 0, 0, 0, 0x41, 0, 0, 0x01, 0x82, 0, 0, 0, 16, // PCR_Extend(16)
				0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0, // password session, empty
				0, 0, 0, 1, 0, 0x0b} // one SHA-256 digest follows
			extend = append(extend, bytes.Repeat([]byte{7}, 32)...)
			if rsp, err := tpm.Send(extend); err != nil || binary.BigEndian.Uint32(rsp[6:10]) != 0 {
				t.Fatalf("PCR_Extend: %x, %v", rsp, err)
			}
			before := readPCR16(t, tpm)
			if err := tpm.Close(); err != nil {
				t.Fatal(err)
			}
			again, err := tpmdev.Open("swtpm:path=" + data + ",ctrl=" + ctrl)
			if err != nil {
				t.Fatalf("second Open: %v", err)
			}
			defer again.Close()
			if after := readPCR16(t, again); !bytes.Equal(after, before) || bytes.Equal(after, make([]byte, 32)) {
				t.Fatalf("PCR16 %x after a second Open, want %x (non-zero): the TPM was reset", after, before)
			}
		})
		t.Run(name+"/not powered on without ctrl", func(t *testing.T) {
			data, _ := swtpmUnder(t, bin)
			_, err := tpmdev.Open("swtpm:path=" + data)
			if err == nil || !strings.Contains(err.Error(), "not powered on") || !strings.Contains(err.Error(), "ctrl=") {
				t.Fatalf("Open without ctrl of a TPM before CMD_INIT: %v, want the way out (ctrl=, swtpm_ioctl -i, --flags)", err)
			}
		})
		t.Run(name+"/started by its flags", func(t *testing.T) {
			data, _ := swtpmUnder(t, bin, "--flags", "not-need-init,startup-clear")
			tpm, err := tpmdev.Open("swtpm:path=" + data)
			if err != nil {
				t.Fatal(err)
			}
			defer tpm.Close()
			useTPM(t, tpm)
		})
	}
}

// readPCR16 reads SHA-256 PCR 16.
func readPCR16(t *testing.T, tpm transport.TPM) []byte {
	t.Helper()
	cmd := []byte{0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1}
	rsp, err := tpm.Send(cmd)
	if err != nil || len(rsp) < 32 || binary.BigEndian.Uint32(rsp[6:10]) != 0 {
		t.Fatalf("PCR_Read: %x, %v", rsp, err)
	}
	return rsp[len(rsp)-32:]
}
