package systemd

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestUnitExposure keeps the units hardened: systemd-analyze's offline security score
// must stay at or below each unit's recorded ceiling (a bare Type=notify unit scores 9.2).
// nkp-hostd runs as root with the capabilities its job needs; its unit says why each
// remaining exposure is there.
func TestUnitExposure(t *testing.T) {
	e2e.Require(t, "systemd-analyze")
	tests := []struct {
		unit string
		max  float64
	}{
		{"nkp-provider.service", 1.9},
		{"nkp-hostd.service", 2.9},
	}
	for _, tt := range tests {
		out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "./"+tt.unit).CombinedOutput()
		if err != nil {
			t.Fatalf("systemd-analyze security %s: %v\n%s", tt.unit, err, out)
		}
		m := regexp.MustCompile(`Overall exposure level for ` + regexp.QuoteMeta(tt.unit) + `: ([0-9.]+)`).FindSubmatch(out)
		if m == nil {
			t.Fatalf("%s: no exposure level in:\n%s", tt.unit, out)
		}
		score, err := strconv.ParseFloat(string(m[1]), 64)
		if err != nil || score > tt.max {
			t.Errorf("%s: exposure %s, want at most %.1f (%v)", tt.unit, m[1], tt.max, err)
		}
		t.Logf("%s exposure: %.1f", tt.unit, score)
	}
}

// TestUnitVerify runs systemd-analyze verify on each unit, with ExecStart pointed at an
// existing program (verify insists the binary is installed): any other complaint, such as
// an unknown directive or a bad value, fails the test.
func TestUnitVerify(t *testing.T) {
	e2e.Require(t, "systemd-analyze")
	for _, unit := range []string{"nkp-provider.service", "nkp-hostd.service"} {
		b, err := os.ReadFile(unit)
		if err != nil {
			t.Fatal(err)
		}
		bin := "/usr/bin/" + strings.TrimSuffix(unit, ".service")
		if !strings.Contains(string(b), "ExecStart="+bin+" ") {
			t.Fatalf("%s: ExecStart does not run %s", unit, bin)
		}
		p := filepath.Join(t.TempDir(), unit)
		if err := os.WriteFile(p, []byte(strings.ReplaceAll(string(b), "ExecStart="+bin+" ", "ExecStart=/bin/true ")), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("systemd-analyze", "verify", p).CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
		}
	}
}

// TestListenerActivated runs this test binary as a child that receives a listening socket
// as fd 3 with LISTEN_FDS=1, the way systemd passes it, and checks that Listener returns
// that socket rather than opening its own.
func TestListenerActivated(t *testing.T) {
	if os.Getenv("NKP_SYSTEMD_ACTIVATION_CHILD") == "1" {
		os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid())) // systemd sets it after fork
		l, err := Listener("127.0.0.1:0")                  // the address must come from the passed fd
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		fmt.Println("ADDR", l.Addr().String())
		os.Exit(0)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestListenerActivated$")
	cmd.Env = append(os.Environ(), "NKP_SYSTEMD_ACTIVATION_CHILD=1", "LISTEN_FDS=1")
	cmd.ExtraFiles = []*os.File{f} // fd 3
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if want := "ADDR " + l.Addr().String(); !strings.Contains(string(out), want) {
		t.Fatalf("child printed %q, want %q", out, want)
	}
}
