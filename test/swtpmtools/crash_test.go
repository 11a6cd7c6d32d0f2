package swtpmtools

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// connTPM is a go-tpm transport over a data socket: one command written, one response
// read, framed by the size field of the response header.
type connTPM struct{ c net.Conn }

// Send implements transport.TPM.
func (t *connTPM) Send(cmd []byte) ([]byte, error) {
	t.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := t.c.Write(cmd); err != nil {
		return nil, fmt.Errorf("write TPM command: %w", err)
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(t.c, hdr); err != nil {
		return nil, fmt.Errorf("read TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > 1<<16 {
		return nil, fmt.Errorf("TPM response size %d out of range", size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(t.c, rsp[10:]); err != nil {
		return nil, fmt.Errorf("read TPM response body: %w", err)
	}
	return rsp, nil
}

var _ transport.TPM = (*connTPM)(nil)

const crashIndex = tpm2.TPMHandle(0x01500020)

var ownerAuth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}

func nvDefine(tpm transport.TPM) error {
	_, err := tpm2.NVDefineSpace{
		AuthHandle: ownerAuth,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    crashIndex,
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
			DataSize:   8,
		}),
	}.Execute(tpm)
	return err
}

func nvHandle(tpm transport.TPM) (tpm2.NamedHandle, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: crashIndex}.Execute(tpm)
	if err != nil {
		return tpm2.NamedHandle{}, err
	}
	return tpm2.NamedHandle{Handle: crashIndex, Name: pub.NVName}, nil
}

func nvWriteU64(tpm transport.TPM, h tpm2.NamedHandle, v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := tpm2.NVWrite{AuthHandle: ownerAuth, NVIndex: h, Data: tpm2.TPM2BMaxNVBuffer{Buffer: b[:]}}.Execute(tpm)
	return err
}

func nvReadU64(tpm transport.TPM, h tpm2.NamedHandle) (uint64, error) {
	rsp, err := tpm2.NVRead{AuthHandle: ownerAuth, NVIndex: h, Size: 8}.Execute(tpm)
	if err != nil {
		return 0, err
	}
	if len(rsp.Data.Buffer) != 8 {
		return 0, fmt.Errorf("NV_Read returned %d bytes, want 8", len(rsp.Data.Buffer))
	}
	return binary.BigEndian.Uint64(rsp.Data.Buffer), nil
}

func randDuration(max time.Duration) time.Duration {
	n, _ := rand.Int(rand.Reader, big.NewInt(int64(max)))
	return time.Duration(n.Int64())
}

// TestKillDuringNVWrites streams NV writes through a go-tpm client over the data socket
// of a backend with encrypted state, kills it with SIGKILL at a random instant, restarts
// it, and checks that the state loads and the index holds the last acknowledged write or
// the one in flight when the kill came (never an older value, never garbage). It runs
// hundreds of trials, bounded by time; for nkp-swtpm also on a linear state file.
func TestKillDuringNVWrites(t *testing.T) {
	const (
		maxTrials = 300
		minTrials = 50
		budget    = 60 * time.Second
		maxDelay  = 25 * time.Millisecond
	)
	key := hexKeyFile(t)
	forEachBackend(t, func(t *testing.T, be backend) {
		state, dir := t.TempDir(), sockDir(t)
		opts := procOpts{stateDir: state, dir: dir,
			extra: append([]string{"--key", "file=" + key + ",mode=aes-256-cbc"}, startupFlags...)}
		killDuringNVWrites(t, be, opts, maxTrials, minTrials, budget, maxDelay)
		if be.name == "nkp-swtpm" {
			// The linear file (swtpm's writes it in place, so only nkp-swtpm's is tried).
			t.Run("linear file", func(t *testing.T) {
				opts.stateDir, opts.stateFile = "", filepath.Join(t.TempDir(), "tpm.img")
				killDuringNVWrites(t, be, opts, maxTrials, minTrials, budget, maxDelay)
			})
		}
	})
}

func killDuringNVWrites(t *testing.T, be backend, opts procOpts, maxTrials, minTrials int, budget, maxDelay time.Duration) {
	{
		var (
			defined   bool
			lastAcked uint64 // last write the TPM answered with success
			inFlight  uint64 // the write sent when the kill came (lastAcked+1)
			trials    int
			landed    int // trials where the in-flight write was found after the restart
			writes    int
		)
		deadline := time.Now().Add(budget)
		for trials < maxTrials && time.Now().Before(deadline) {
			p := startNoWait(t, be, opts)
			if err := p.proc.WaitListening(10*time.Second, p.ctrlAddr(), p.dataAddr()); err != nil {
				if referenceLost(t, be, trials, err, p) {
					p.Kill()
					return
				}
				t.Fatalf("trial %d: %v\nstderr: %s\nlog: %s", trials, err, p.stderr.String(), p.logText())
			}
			conn, err := netDial(p.Data)
			if err != nil {
				t.Fatalf("trial %d: dial: %v", trials, err)
			}
			tpm := &connTPM{c: conn}
			if !defined {
				if err := nvDefine(tpm); err != nil {
					t.Fatalf("NV_DefineSpace: %v", err)
				}
				defined = true
			}
			h, err := nvHandle(tpm)
			if err != nil && referenceLost(t, be, trials, err, p) {
				conn.Close()
				p.Kill()
				return
			}
			if err != nil {
				t.Fatalf("trial %d: the state after a kill does not hold the index: NV_ReadPublic: %v\nlog: %s", trials, err, p.logText())
			}
			if trials > 0 || lastAcked > 0 {
				got, err := nvReadU64(tpm, h)
				if err != nil && lastAcked == 0 && errors.Is(err, tpm2.TPMRCNVUninitialized) {
					// The kill came before the first write was acknowledged (it is
					// timed from the start, up to maxDelay): the index was never
					// written, which is what the TPM says.
					got, err = 0, nil
				}
				if err != nil && referenceLost(t, be, trials, err, p) {
					conn.Close()
					p.Kill()
					return
				}
				if err != nil {
					t.Fatalf("trial %d: NV_Read after a kill: %v\nlog: %s", trials, err, p.logText())
				}
				switch got {
				case lastAcked:
				case inFlight:
					landed++
				default:
					t.Fatalf("trial %d: NV index holds %d after a kill; want the last acknowledged write %d or the one in flight %d", trials, got, lastAcked, inFlight)
				}
				lastAcked = got
			}
			pid := p.pid()
			timer := time.AfterFunc(randDuration(maxDelay), func() { syscall.Kill(pid, syscall.SIGKILL) })
			for {
				inFlight = lastAcked + 1
				if err := nvWriteU64(tpm, h, inFlight); err != nil {
					break // the kill came
				}
				lastAcked = inFlight
				writes++
				if p.exited() {
					break
				}
			}
			timer.Stop()
			conn.Close()
			p.Kill()
			trials++
		}
		t.Logf("%s: %d kill -9 trials, %d acknowledged writes, in-flight write found after %d kills", be.name, trials, writes, landed)
		if trials < minTrials {
			t.Errorf("only %d trials within %v, want at least %d", trials, budget, minTrials)
		}
	}
}

// referenceLost reports whether the run is the reference's (swtpm 0.7.1) and logs
// that its state did not survive a kill -9: swtpm's own crash safety is not what this
// test holds to account (it lost its state once in about 200 kills here, "illegal pad
// length" at the next start), so the reference's trials end there instead of failing
// the test. nkp-swtpm's never do: for it, the caller fails.
func referenceLost(t *testing.T, be backend, trial int, err error, p *tpmProc) bool {
	t.Helper()
	if be.name != "swtpm" {
		return false
	}
	t.Logf("reference swtpm lost its state after kill -9 at trial %d (its trials end here): %v\nlog: %s", trial, err, p.logText())
	return true
}
