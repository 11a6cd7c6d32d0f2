package state

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/test/e2e"
)

// child starts this test binary as another process in role on dir, with stdout piped.
func child(t *testing.T, role, dir, keyFile string, extraEnv ...string) (*exec.Cmd, *bufio.Reader, io.WriteCloser) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"="+role, envDir+"="+dir, envKeyFile+"="+keyFile)
	cmd.Env = append(cmd.Env, extraEnv...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, bufio.NewReader(out), in
}

func TestLockSameProcess(t *testing.T) {
	dir := t.TempDir()
	d := mustOpen(t, dir, Options{})
	_, err := Open(dir, Options{})
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("second Open: %v, want ErrLocked naming %s", err, dir)
	}
	if err := d.ReleaseLock(); err != nil {
		t.Fatal(err)
	}
	if err := d.Store("permall", []byte("x")); !errors.Is(err, ErrLockReleased) {
		t.Fatalf("Store without the lock: %v", err)
	}
	other := mustOpen(t, dir, Options{}) // the destination of a shared-storage migration
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.LockStorage(ctx, 3); !errors.Is(err, ErrLocked) {
		t.Fatalf("LockStorage while another holds it: %v", err)
	}
	other.Close()
	if err := d.LockStorage(ctx, 3); err != nil {
		t.Fatalf("LockStorage after the other closed: %v", err)
	}
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("Open after LockStorage: %v", err)
	}
	if err := d.Store("permall", []byte("x")); err != nil {
		t.Fatalf("Store after LockStorage: %v", err)
	}
	d.Close()
	mustOpen(t, dir, Options{})
}

// TestDeferLock: an incoming migration on shared storage opens the directory while the
// source still holds it, reads, and takes the lock once the source lets go.
func TestDeferLock(t *testing.T) {
	dir := t.TempDir()
	src := mustOpen(t, dir, Options{})
	if err := src.Store("permall", []byte("state")); err != nil {
		t.Fatal(err)
	}
	dst, err := Open(dir, Options{DeferLock: true})
	if err != nil {
		t.Fatalf("Open with DeferLock while the source holds the lock: %v", err)
	}
	defer dst.Close()
	if b, err := dst.Load("permall"); err != nil || string(b) != "state" {
		t.Fatalf("Load before locking: %q, %v", b, err)
	}
	if err := dst.Store("permall", []byte("x")); !errors.Is(err, ErrLockReleased) {
		t.Fatalf("Store before locking: %v", err)
	}
	ctx := context.Background()
	if err := dst.LockStorage(ctx, 0); !errors.Is(err, ErrLocked) {
		t.Fatalf("LockStorage while the source holds it: %v", err)
	}
	if err := src.ReleaseLock(); err != nil {
		t.Fatal(err)
	}
	if err := dst.LockStorage(ctx, 0); err != nil {
		t.Fatalf("LockStorage after the source released: %v", err)
	}
	if err := dst.Store("permall", []byte("migrated")); err != nil {
		t.Fatal(err)
	}
	if err := src.Store("permall", []byte("stale")); !errors.Is(err, ErrLockReleased) {
		t.Fatalf("the source wrote after handing over: %v", err)
	}
}

func TestLockOtherProcess(t *testing.T) {
	dir := t.TempDir()
	cmd, out, in := child(t, "locker", dir, "")
	line, err := out.ReadString('\n')
	if err != nil || line != "locked\n" {
		t.Fatalf("child: %q, %v", line, err)
	}
	_, err = Open(dir, Options{})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("Open while another process holds the lock: %v", err)
	}
	for _, want := range []string{dir, "in use", "another process holds", "stop the nkp-swtpm or swtpm"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q lacks %q", err, want)
		}
	}
	in.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	d, err := Open(dir, Options{})
	if err != nil {
		t.Fatalf("Open after the other process ended: %v", err)
	}
	d.Close()
}

// TestLockSwtpm: real swtpm and nkp exclude each other through the same .lock file.
func TestLockSwtpm(t *testing.T) {
	e2e.Require(t, "swtpm", "swtpm_ioctl")
	dir := t.TempDir()
	ctrl := filepath.Join(t.TempDir(), "ctrl")
	swtpmArgs := []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir,
		"--ctrl", "type=unixio,path=" + ctrl, "--flags", "not-need-init,startup-clear"}

	// nkp holds the directory: swtpm must refuse to start on it.
	d := mustOpen(t, dir, Options{})
	res, err := exec.Command("swtpm", swtpmArgs...).CombinedOutput()
	if err == nil || !strings.Contains(string(res), "lock") {
		t.Fatalf("swtpm started on a directory nkp holds: %v: %s", err, res)
	}
	d.Close()

	// swtpm holds it: nkp must refuse, naming swtpm's pid.
	cmd := exec.Command("swtpm", swtpmArgs...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = exec.Command("swtpm_ioctl", "--unix", ctrl, "-s").Run()
		_ = cmd.Wait()
	})
	e2e.WaitFor(t, 5*time.Second, "swtpm's control socket", func() bool {
		_, err := os.Stat(ctrl)
		return err == nil
	})
	// swtpm opens its control socket before it locks the directory, and while it starts
	// the TPM (not-need-init) it may drop and retake the lock: wait until it answers on
	// its control channel (its main loop runs, start-up is over), then for the lock
	// itself, looking without taking it (taking it would make swtpm fail). A CI run saw
	// Open refused while F_GETLK found no holder a moment later.
	e2e.WaitFor(t, 5*time.Second, "swtpm to answer on its control channel", func() bool {
		return exec.Command("swtpm_ioctl", "--unix", ctrl, "-g").Run() == nil
	})
	e2e.WaitFor(t, 5*time.Second, "swtpm's lock on "+dir, func() bool { return lockHeld(filepath.Join(dir, lockFile)) })
	_, err = Open(dir, Options{})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("Open while swtpm runs on the directory: %v", err)
	}
	if want := fmt.Sprintf("pid %d", cmd.Process.Pid); !strings.Contains(err.Error(), want) {
		t.Errorf("message %q does not name swtpm (%s)", err, want)
	}
}

// TestKill9DuringWrites kills a writer process with SIGKILL at random instants while it
// stores an increasing counter, hundreds of times: the state must always load, and hold
// exactly the last acknowledged value or the one being written when it died. It runs
// with fsync (the default) and with NoSync, which must be just as safe against a kill.
func TestKill9DuringWrites(t *testing.T) {
	tests := []struct {
		name   string
		trials int
		env    []string
	}{
		{"fsync", 300, nil},
		{"no fsync", 100, []string{envNoSync + "=1"}},
		{"linear file", 300, []string{envLinear + "=1"}},
		{"linear file, no fsync", 100, []string{envLinear + "=1", envNoSync + "=1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { kill9DuringWrites(t, tt.trials, tt.env) })
	}
}

func kill9DuringWrites(t *testing.T, trials int, env []string) {
	dir := t.TempDir()
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte(strings.Repeat("5a", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := ParseKey(KeySpec{Source: KeyFile, Path: keyFile}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Wipe()
	linear := slices.Contains(env, envLinear+"=1")
	open := func() (store, error) { return Open(dir, Options{Key: key}) }
	if linear {
		// Another blob in the file, so that the counter's moves pass it.
		dir = filepath.Join(dir, "tpm.img")
		l, err := OpenLinear(dir, Options{Mode: 0o600, Key: key})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Store("volatilestate", counterBlob(77)); err != nil {
			t.Fatal(err)
		}
		l.Close()
		open = func() (store, error) { return OpenLinear(dir, Options{Key: key}) }
	}

	budget := 60 * time.Second
	if testing.Short() {
		trials, budget = trials/10, 10*time.Second
	}
	deadline := time.Now().Add(budget)
	var stored uint64 // the value on disk after the previous trial
	done, withAcks, inFlight := 0, 0, 0
	for ; done < trials && time.Now().Before(deadline); done++ {
		cmd, out, in := child(t, "writer", dir, keyFile, env...)
		line, err := out.ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "ready ") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("trial %d: writer: %q, %v", done, line, err)
		}
		if n, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimPrefix(line, "ready ")), 10, 64); n != stored {
			t.Fatalf("trial %d: writer started from %d, the last trial left %d", done, n, stored)
		}
		// Let the writer get k acknowledged writes in (k random in 0..2), then kill it at
		// a random instant within the next write or two (each costs a few fsyncs). The
		// delay is the experiment's random variable, not a wait for anything: what
		// follows reads the writer's pipe to its end and reaps it.
		last := stored
		readAck := func() bool {
			l, err := out.ReadString('\n')
			if err != nil {
				return false
			}
			n, perr := strconv.ParseUint(strings.TrimSpace(l), 10, 64)
			if perr != nil {
				t.Fatalf("trial %d: writer said %q", done, l)
			}
			last = n
			return true
		}
		for k := rand.IntN(3); k > 0 && readAck(); k-- {
		}
		time.Sleep(time.Duration(rand.Int64N(int64(3 * time.Millisecond))))
		_ = cmd.Process.Signal(syscall.SIGKILL)
		for readAck() {
		}
		in.Close()
		werr := cmd.Wait()
		if ws, ok := werr.(*exec.ExitError); !ok || ws.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("trial %d: writer ended with %v, not by SIGKILL", done, werr)
		}
		if last > stored {
			withAcks++
		}

		d, err := open()
		if err != nil {
			t.Fatalf("trial %d: Open after kill: %v", done, err)
		}
		got, err := loadCounter(d)
		if linear {
			if v, err := d.Load("volatilestate"); err != nil || !bytes.Equal(v, counterBlob(77)) {
				t.Fatalf("trial %d: the other blob after kill -9: %v", done, err)
			}
		}
		d.Close()
		if err != nil {
			t.Fatalf("trial %d: state does not load after kill -9: %v", done, err)
		}
		switch got {
		case last:
		case last + 1:
			inFlight++ // the write completed but its acknowledgement was not sent
		default:
			t.Fatalf("trial %d: state holds %d; last acknowledged %d", done, got, last)
		}
		stored = got
	}
	t.Logf("%d kill -9 trials, %d with acknowledged writes, %d ended with an unacknowledged complete write; final counter %d", done, withAcks, inFlight, stored)
	if min := trials / 3; done < min {
		t.Fatalf("only %d trials in %v (want at least %d): machine too slow?", done, budget, min)
	}
	if withAcks < done/4 {
		t.Errorf("only %d of %d trials saw a write acknowledged: the kills came too early to test anything", withAcks, done)
	}
}

// lockHeld reports whether some process holds a write lock on path, without taking it.
func lockHeld(path string) bool {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	return unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk) == nil && lk.Type != unix.F_UNLCK
}
