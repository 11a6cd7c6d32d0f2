package atomicfile_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

// names lists a directory.
func names(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func TestWriteFile(t *testing.T) {
	tests := []struct {
		name  string
		old   []byte // nil: no file before
		data  []byte
		perm  os.FileMode
		umask bool
	}{
		{"new secret", nil, []byte("key"), 0o600, false},
		{"new public", nil, []byte("cert"), 0o644, false},
		{"replace, mode changes", []byte("older and longer content"), []byte("new"), 0o640, false},
		{"empty", []byte("x"), nil, 0o600, false},
		{"large", nil, bytes.Repeat([]byte("0123456789abcdef"), 1<<16), 0o600, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "f")
			if tt.old != nil {
				if err := os.WriteFile(p, tt.old, 0o666); err != nil {
					t.Fatal(err)
				}
			}
			if err := atomicfile.WriteFile(p, tt.data, tt.perm); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(p)
			if err != nil || !bytes.Equal(got, tt.data) {
				t.Fatalf("content %d bytes (%v), want %d", len(got), err, len(tt.data))
			}
			fi, _ := os.Stat(p)
			if fi.Mode().Perm() != tt.perm {
				t.Errorf("mode %v, want %v", fi.Mode().Perm(), tt.perm)
			}
			if n := names(t, dir); len(n) != 1 {
				t.Errorf("directory holds %q, want only f (a temporary file left?)", n)
			}
		})
	}
}

func TestWriteNew(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "root.key")
	if err := atomicfile.WriteNew(p, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteNew(p, []byte("second"), 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("WriteNew over a file: %v, want fs.ErrExist", err)
	}
	if got, _ := os.ReadFile(p); string(got) != "first" {
		t.Fatalf("content %q after a refused WriteNew, want first", got)
	}
	dangling := filepath.Join(dir, "link")
	if err := os.Symlink(filepath.Join(dir, "nowhere"), dangling); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteNew(dangling, []byte("x"), 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("WriteNew over a dangling symlink: %v, want fs.ErrExist", err)
	}
	if n := names(t, dir); len(n) != 2 {
		t.Errorf("directory holds %q, want root.key and link only", n)
	}
}

// TestSymlinkReplaced: a symlink at the name is replaced, its target untouched.
func TestSymlinkReplaced(t *testing.T) {
	dir := t.TempDir()
	target, link := filepath.Join(dir, "target"), filepath.Join(dir, "link")
	if err := os.WriteFile(target, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteFile(link, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(target); string(got) != "keep" {
		t.Errorf("symlink target now %q, want it untouched", got)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink != 0 {
		t.Errorf("name is still a symlink (%v)", err)
	}
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "no", "such", "dir", "f")
	if err := atomicfile.WriteFile(missing, []byte("x"), 0o600); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("WriteFile in a missing directory: %v, want an error naming %s", err, missing)
	}
	// The name is a directory: rename fails, nothing is left behind.
	sub := filepath.Join(dir, "sub")
	if err := os.MkdirAll(filepath.Join(sub, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteFile(sub, []byte("x"), 0o600); err == nil || !strings.Contains(err.Error(), sub) {
		t.Errorf("WriteFile over a non-empty directory: %v, want an error naming it", err)
	}
	if n := names(t, dir); len(n) != 1 {
		t.Errorf("directory holds %q after failures, want only sub", n)
	}
}

func TestCreateCommitAbort(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := atomicfile.Create(p, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(f, "half")
	f.Abort()
	if got, _ := os.ReadFile(p); string(got) != "old" {
		t.Fatalf("content %q after Abort, want old", got)
	}
	if n := names(t, dir); len(n) != 1 {
		t.Fatalf("directory holds %q after Abort", n)
	}
	f, err = atomicfile.Create(p, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Abort() // no effect after Commit
	fmt.Fprint(f, "streamed")
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := f.Commit(); err == nil {
		t.Error("second Commit succeeded")
	}
	if got, _ := os.ReadFile(p); string(got) != "streamed" {
		t.Fatalf("content %q after Commit", got)
	}
}

func TestCleanTemps(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state")
	for _, n := range []string{".state.tmp-1", ".state.tmp-2", ".other.tmp-1", "state", ".state.tmp"} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := atomicfile.CleanTemps(p)
	if err != nil || len(removed) != 2 {
		t.Fatalf("CleanTemps = %q, %v; want the two .state.tmp-* files", removed, err)
	}
	if n := names(t, dir); strings.Join(n, " ") != ".other.tmp-1 .state.tmp state" {
		t.Fatalf("left %q", n)
	}
	for name, want := range map[string]bool{".other.tmp-1": true, ".v1.json.tmp-123": true, "state": false, ".state.tmp": false, "a.tmp-1": false} {
		if atomicfile.IsTemp(name) != want {
			t.Errorf("IsTemp(%q) = %v, want %v", name, !want, want)
		}
	}
}

// Several names: one listing of each directory, every name's leftovers removed, the
// names' own files and other names' temporaries kept, the order of the names irrelevant.
func TestCleanTempsSeveral(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	files := map[string][]string{
		a: {".x.tmp-1", ".y.tmp-2", ".y.tmp-3", ".z.tmp-1", "x", "y", ".x.tmp"},
		b: {".w.tmp-9", "w"},
	}
	for dir, ns := range files {
		for _, n := range ns {
			if err := os.WriteFile(filepath.Join(dir, n), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	removed, err := atomicfile.CleanTemps(filepath.Join(a, "y"), filepath.Join(b, "w"), filepath.Join(a, "x"))
	if err != nil || len(removed) != 4 {
		t.Fatalf("CleanTemps = %q, %v; want .x.tmp-1, .y.tmp-2, .y.tmp-3 and .w.tmp-9", removed, err)
	}
	if n := names(t, a); strings.Join(n, " ") != ".x.tmp .z.tmp-1 x y" {
		t.Fatalf("left in the first directory %q", n)
	}
	if n := names(t, b); strings.Join(n, " ") != "w" {
		t.Fatalf("left in the second directory %q", n)
	}
	if _, err := atomicfile.CleanTemps(filepath.Join(a, "missing", "v")); err == nil || !strings.Contains(err.Error(), "missing/v") {
		t.Fatalf("CleanTemps in a missing directory: %v, want an error naming the path", err)
	}
}

// The kill -9 test: a child process replaces one file in a loop and reports each
// completed write; it is killed at random instants. Every record says its sequence
// number and size and is filled with one byte, so a torn or mixed file shows.

const (
	envChild = "NKP_ATOMICFILE_CHILD"
	header   = "nkp-atomicfile-test seq "
)

// record is the content of write number seq; sizes vary from 1 byte to 256 KiB so
// writes take from microseconds to milliseconds.
func record(seq int) []byte {
	size := 1 + (seq*7919)%(256<<10)
	return append([]byte(fmt.Sprintf("%s%d size %d\n", header, seq, size)), bytes.Repeat([]byte{byte(seq)}, size)...)
}

// parseRecord returns the sequence number of a whole, untorn record.
func parseRecord(b []byte) (int, error) {
	line, rest, ok := bytes.Cut(b, []byte("\n"))
	if !ok || !bytes.HasPrefix(line, []byte(header)) {
		return 0, fmt.Errorf("no header in %d bytes", len(b))
	}
	var seq, size int
	if _, err := fmt.Sscanf(string(line[len(header):]), "%d size %d", &seq, &size); err != nil {
		return 0, fmt.Errorf("header %q: %v", line, err)
	}
	if !bytes.Equal(b, record(seq)) {
		return 0, fmt.Errorf("record %d is torn or mixed: %d bytes after the header, want %d", seq, len(rest), size)
	}
	return seq, nil
}

// TestKill9Child is the child's loop; it runs only when started by TestKill9.
func TestKill9Child(t *testing.T) {
	p := os.Getenv(envChild)
	if p == "" {
		t.Skip("run by TestKill9")
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	seq, err := parseRecord(b)
	if err != nil {
		t.Fatal(err)
	}
	out := bufio.NewWriter(os.Stdout)
	for {
		seq++
		if err := atomicfile.WriteFile(p, record(seq), 0o600); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(out, seq) // acknowledged
		out.Flush()
	}
}

// TestKill9 kills a writing child with SIGKILL at random instants, many times: the file
// is always a whole record, the last acknowledged one or the one being written, and
// what a crash leaves is only temporary files beside the name, which CleanTemps removes.
func TestKill9(t *testing.T) {
	if os.Getenv(envChild) != "" {
		t.Skip("in the child")
	}
	rounds := 40
	if testing.Short() {
		rounds = 10
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "state")
	if err := atomicfile.WriteFile(p, record(0), 0o600); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	writes, inFlight := 0, 0
	for round := range rounds {
		cur, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		start, err := parseRecord(cur)
		if err != nil {
			t.Fatalf("round %d: before the child: %v", round, err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestKill9Child$", "-test.count=1")
		cmd.Env = append(os.Environ(), envChild+"="+p)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		acks, first := make(chan int), make(chan struct{})
		go func() {
			last := start
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if n, err := strconv.Atoi(sc.Text()); err == nil {
					if last == start {
						close(first)
					}
					last = n
				}
			}
			acks <- last
		}()
		// Once it writes, let it run a random time (up to some hundred writes): the
		// instant of the kill is what the test varies, not a synchronisation.
		select {
		case <-first:
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: the child acknowledged no write in 30 s: %s", round, stderr.String())
		}
		time.Sleep(time.Duration(rng.IntN(20_000)) * time.Microsecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		lastAck := <-acks
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: child ended by %v, not by SIGKILL: %s", round, err, stderr.String())
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		seq, err := parseRecord(got)
		if err != nil {
			t.Fatalf("round %d (last acknowledged %d): %v", round, lastAck, err)
		}
		if seq == lastAck+1 {
			inFlight++
		}
		if seq != lastAck && seq != lastAck+1 {
			t.Fatalf("round %d: file holds write %d; want the last acknowledged %d or the next", round, seq, lastAck)
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
			t.Fatalf("round %d: mode %v", round, fi.Mode().Perm())
		}
		for _, n := range names(t, dir) {
			if n != "state" && !strings.HasPrefix(n, ".state.tmp-") {
				t.Fatalf("round %d: unexpected file %q", round, n)
			}
		}
		writes += lastAck - start
	}
	tmps := len(names(t, dir)) - 1
	t.Logf("%d kills over %d acknowledged writes: %d after a rename not yet acknowledged, %d temporary files left beside the name", rounds, writes, inFlight, tmps)
	if _, err := atomicfile.CleanTemps(p); err != nil {
		t.Fatal(err)
	}
	if n := names(t, dir); len(n) != 1 {
		t.Fatalf("after CleanTemps the directory holds %q", n)
	}
}
