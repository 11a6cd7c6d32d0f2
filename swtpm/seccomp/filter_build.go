//go:build !amd64

package seccomp

import (
	"fmt"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/swtpm/seccomp/internal/policy"
)

// instructions returns the filter for action a and process pid: on architectures
// without a generated table it is assembled from package internal/policy now.
func instructions(a Action, pid int) ([]unix.SockFilter, error) {
	ret, _, err := a.ret()
	if err != nil {
		return nil, err
	}
	insts, err := policy.Build(ret, uint32(pid))
	if err != nil {
		return nil, fmt.Errorf("%w: run with --seccomp action=none on this architecture", err)
	}
	raw, err := bpf.Assemble(insts)
	if err != nil {
		return nil, fmt.Errorf("seccomp: assemble the %v filter: %w", a, err)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, in := range raw {
		out[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	return out, nil
}
