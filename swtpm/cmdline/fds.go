package cmdline

// InheritedFDs lists the file descriptors (>= 3) that the options name: the ones a
// process starting nkp-swtpm with these options must pass to it under the same
// numbers (and a daemonized nkp-swtpm passes on to its child). Listening and
// connected sockets come first, then key, log and pid fds.
func (o *Options) InheritedFDs() []int {
	var fds []int
	add := func(fd int) {
		if fd >= 3 {
			fds = append(fds, fd)
		}
	}
	for _, c := range []*Channel{o.Ctrl, o.Server} {
		if c != nil {
			add(c.ListenFD)
			add(c.ConnFD)
		}
	}
	for _, k := range []*KeyOptions{o.Key, o.MigrationKey} {
		if k != nil {
			add(k.FD)
			add(k.PwdFD)
		}
	}
	if o.Log != nil {
		add(o.Log.FD)
	}
	if o.Pid != nil {
		add(o.Pid.FD)
	}
	return fds
}
