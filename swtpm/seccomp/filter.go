package seccomp

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// genFilter is a filter program generated at build time for one architecture.
type genFilter struct {
	arch      string
	pidSlots  []int // instructions whose K is the pid
	kill, log []unix.SockFilter
}

// program returns a copy of the program for a with pid put in.
func (g *genFilter) program(a Action, pid int) ([]unix.SockFilter, error) {
	var src []unix.SockFilter
	switch a {
	case Kill:
		src = g.kill
	case Log:
		src = g.log
	default:
		return nil, fmt.Errorf("seccomp: action %v installs no filter", a)
	}
	p := append([]unix.SockFilter(nil), src...)
	for _, i := range g.pidSlots {
		p[i].K = uint32(pid)
	}
	return p, nil
}
