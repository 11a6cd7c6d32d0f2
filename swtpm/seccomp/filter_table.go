//go:build amd64

package seccomp

//go:generate go run ./internal/gen

import "golang.org/x/sys/unix"

// instructions returns the filter for action a and process pid: on amd64 the table
// generated from package internal/policy at build time (zfilter_amd64.go, checked
// against the policy by TestGeneratedFilterUpToDate), with the pid put in.
func instructions(a Action, pid int) ([]unix.SockFilter, error) {
	return generated.program(a, pid)
}
