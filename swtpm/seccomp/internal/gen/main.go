// Command gen writes swtpm/seccomp's generated filter table for the running
// architecture (go generate in swtpm/seccomp, on amd64: zfilter_amd64.go).
package main

import (
	"fmt"
	"os"
	"runtime"

	"github.com/nkp-dev/nkp/swtpm/seccomp/internal/policy"
)

func main() {
	src, err := policy.Source()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
	out := "zfilter_" + runtime.GOARCH + ".go"
	if err := os.WriteFile(out, src, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}
