package logbuf_test

import (
	"strings"
	"sync"
	"testing"

	"github.com/nkp-dev/nkp/test/logbuf"
)

// TestConcurrentWrites: writes from many goroutines all arrive, whole (run with -race).
func TestConcurrentWrites(t *testing.T) {
	tests := []struct {
		name    string
		writers int
		line    string
	}{
		{"one writer", 1, "a\n"},
		{"many writers", 16, "level=INFO msg=x\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b logbuf.Buffer
			var wg sync.WaitGroup
			for range tc.writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range 100 {
						if n, err := b.Write([]byte(tc.line)); n != len(tc.line) || err != nil {
							t.Errorf("Write = %d, %v", n, err)
						}
					}
				}()
			}
			wg.Wait()
			if got, want := b.String(), strings.Repeat(tc.line, 100*tc.writers); got != want {
				t.Fatalf("String() has %d bytes, want %d of whole lines", len(got), len(want))
			}
		})
	}
}
