package systemd

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestUnitExposure keeps nkp-provider.service hardened: systemd-analyze's offline
// security score must stay below 2.0 (a bare Type=notify unit scores 9.2).
func TestUnitExposure(t *testing.T) {
	e2e.Require(t, "systemd-analyze")
	out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "./nkp-provider.service").CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for nkp-provider.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	score, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil || score >= 2.0 {
		t.Fatalf("exposure %s, want below 2.0 (%v)", m[1], err)
	}
	t.Logf("nkp-provider.service exposure: %.1f", score)
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
