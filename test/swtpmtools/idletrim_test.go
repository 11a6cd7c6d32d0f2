package swtpmtools

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// binaryRSS returns the resident KiB of pid's read-only mappings of its own program
// (/proc/PID/smaps), the segments the idle trim drops.
func binaryRSS(t *testing.T, pid int) int64 {
	t.Helper()
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var total int64
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 {
			continue
		}
		if !strings.HasSuffix(fs[0], ":") {
			in = len(fs) >= 6 && strings.Join(fs[5:], " ") == exe && !strings.Contains(fs[1], "w")
			continue
		}
		if in && fs[0] == "Rss:" && len(fs) >= 2 {
			n, err := strconv.ParseInt(fs[1], 10, 64)
			if err != nil {
				t.Fatalf("smaps line %q: %v", sc.Text(), err)
			}
			total += n
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return total
}

// waitLogCount polls p's log until it holds n lines with s, up to 30 s.
func waitLogCount(t *testing.T, p *tpmProc, s string, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(p.logText(), s) < n {
		if p.exited() {
			t.Fatalf("nkp-swtpm exited while waiting for %q; log: %s", s, p.logText())
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %d× %q in the log within 30 s; log: %s", n, s, p.logText())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestIdleTrim runs nkp-swtpm (encrypted state, the real seccomp filter with
// action=kill) until it has been idle for its trim delay: the resident part of its
// program's read-only segments shrinks, and it still answers with its state intact
// (an NV value written and a PCR extended before the trim read the same after it,
// on the same data connection), and trims again after that activity. Debian's swtpm
// has no idle trim, so it is not run here.
func TestIdleTrim(t *testing.T) {
	be := backends[1]
	p := start(t, be, procOpts{stateDir: t.TempDir(), extra: append([]string{"--key", "file=" + hexKeyFile(t)}, startupFlags...)})
	defer p.Stop()
	c, err := net.DialTimeout("unix", p.Data, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var tpm transport.TPM = &connTPM{c: c}
	if err := nvDefine(tpm); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	h, err := nvHandle(tpm)
	if err != nil {
		t.Fatal(err)
	}
	const value = 0x1d1e7f1a5c0ffee
	if err := nvWriteU64(tpm, h, value); err != nil {
		t.Fatalf("NV_Write: %v", err)
	}
	digest := sha256.Sum256([]byte("idle trim"))
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest[:]}}},
	}).Execute(tpm); err != nil {
		t.Fatalf("PCR_Extend: %v", err)
	}
	wantPCR := sha256.Sum256(append(make([]byte, 32), digest[:]...))
	// Read at once: the last command was just now, the trim comes 2 s later.
	before := binaryRSS(t, p.pid())
	if before < 1024 {
		t.Fatalf("only %d KiB of nkp-swtpm's program resident right after its start, want over 1 MiB", before)
	}
	trims := strings.Count(p.logText(), `msg="idle trim"`)

	waitLogCount(t, p, `msg="idle trim"`, trims+1)
	after := binaryRSS(t, p.pid())
	t.Logf("resident read-only segments of nkp-swtpm: %d KiB before the trim, %d KiB after", before, after)
	// Measured 5016 -> 3036 KiB: what the idle process touches again comes back in
	// whole page-cache folios (up to 1 MB), so ask for 1 MiB less, not for nothing.
	if after > before-1024 {
		t.Errorf("the trim left %d of %d KiB of the program resident, want at least 1024 KiB less", after, before)
	}

	got, err := nvReadU64(tpm, h)
	if err != nil || got != value {
		t.Fatalf("NV_Read after the trim = %#x, %v; want %#x", got, err, value)
	}
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(16)},
	}}}.Execute(tpm)
	if err != nil || len(r.PCRValues.Digests) != 1 || !bytes.Equal(r.PCRValues.Digests[0].Buffer, wantPCR[:]) {
		t.Fatalf("PCR 16 after the trim = %+v, %v; want %x", r, err, wantPCR)
	}
	// That activity is followed by another trim.
	waitLogCount(t, p, `msg="idle trim"`, trims+2)
	if got, err := nvReadU64(tpm, h); err != nil || got != value {
		t.Fatalf("NV_Read after the second trim = %#x, %v; want %#x", got, err, value)
	}
}
