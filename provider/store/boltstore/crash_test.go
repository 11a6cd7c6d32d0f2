package boltstore_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/boltstore"
)

const crashChildEnv = "NKP_BOLTSTORE_CRASH_CHILD"

// TestCrashChild is the writer that TestCrashKeepsAcknowledgedWrites kills; it does
// nothing in a normal run.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("helper process for TestCrashKeepsAcknowledgedWrites")
	}
	s, err := boltstore.Open(path, boltstore.Options{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	var mu sync.Mutex // one line at a time on stdout
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				key := fmt.Sprintf("r%s-g%d-%06d", os.Getenv(crashChildEnv+"_ROUND"), g, i)
				err := s.Update(context.Background(), func(tx store.Tx) error {
					if _, err := audit.Append(tx, audit.Event{Kind: audit.KindRelease, Subject: key}); err != nil {
						return err
					}
					return tx.Put("acked", key, []byte(key))
				})
				mu.Lock()
				if err != nil {
					fmt.Println("error", err)
				} else {
					fmt.Println("ok", key) // acknowledged: it must survive the kill
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// A writer killed with SIGKILL in the middle of concurrent Updates leaves a store that
// opens, holds every write it acknowledged, and whose audit chain verifies.
func TestCrashKeepsAcknowledgedWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "provider.db")
	for round := 1; round <= 3; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path, fmt.Sprintf("%s_ROUND=%d", crashChildEnv, round))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		acked := map[string]bool{}
		lines := bufio.NewScanner(out)
		deadline := time.Now().Add(30 * time.Second)
		for len(acked) < 40*round && lines.Scan() {
			f := strings.Fields(lines.Text())
			if len(f) == 2 && f[0] == "ok" {
				acked[f[1]] = true
			} else if len(f) > 0 && f[0] == "error" {
				t.Fatalf("writer: %s", lines.Text())
			}
			if time.Now().After(deadline) {
				t.Fatalf("only %d writes acknowledged in 30 s", len(acked))
			}
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// Lines already written before the kill are acknowledged too.
		for lines.Scan() {
			if f := strings.Fields(lines.Text()); len(f) == 2 && f[0] == "ok" {
				acked[f[1]] = true
			}
		}
		_ = cmd.Wait()

		s, err := boltstore.Open(path, boltstore.Options{})
		if err != nil {
			t.Fatalf("round %d: reopen after SIGKILL: %v", round, err)
		}
		err = s.View(context.Background(), func(tx store.Tx) error {
			for k := range acked {
				if _, err := tx.Get("acked", k); err != nil {
					return fmt.Errorf("acknowledged write %s lost: %w", k, err)
				}
			}
			if err := audit.Verify(tx); err != nil {
				return err
			}
			seq, _, err := audit.Head(tx)
			n := 0
			_ = tx.List("acked", "", func(string, []byte) error { n++; return nil })
			if err == nil && seq != uint64(n) {
				return fmt.Errorf("audit head %d but %d writes: the record and its action did not commit together", seq, n)
			}
			return err
		})
		s.Close()
		if err != nil {
			t.Fatalf("round %d (%d acknowledged): %v", round, len(acked), err)
		}
		t.Logf("round %d: %d acknowledged writes survived SIGKILL", round, len(acked))
	}
}
