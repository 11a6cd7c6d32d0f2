package vtpmproc

import (
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
	"github.com/nkp-dev/nkp/test/logbuf"
)

// SwtpmFor returns Debian's swtpm, or skips t when it is missing (fails it under
// NKP_E2E=required).
func SwtpmFor(t testing.TB) Backend {
	t.Helper()
	e2e.Require(t, "swtpm")
	b, err := Swtpm()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// NKPSwtpmFor returns nkp-swtpm, from $NKP_BIN or built once per test binary
// (e2e.BuildBinary; call e2e.Cleanup from TestMain).
func NKPSwtpmFor(t testing.TB) Backend {
	t.Helper()
	return Backend{Name: "nkp-swtpm", Path: e2e.BuildBinary(t, "./cmd/nkp-swtpm")}
}

// StartT starts b as Start does, fails t if it cannot, and kills the process when t
// ends.
func StartT(t testing.TB, b Backend, o Options) *Proc {
	t.Helper()
	p, err := Start(b, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	return p
}

// HostTPMT starts b as a host TPM in dir as StartHostTPM does (waiting up to 30 s),
// fails t with the process's output if it cannot, and kills the process when t ends.
func HostTPMT(t testing.TB, b Backend, dir string) *HostTPM {
	t.Helper()
	var out logbuf.Buffer
	h, err := StartHostTPM(b, dir, &out, 30*time.Second)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	t.Cleanup(h.Kill)
	return h
}
