package cli

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/user"
	"strconv"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// Endpoint is an opened --ctrl or --server channel: a listener accepting clients, or a
// connection that already exists (clientfd=, --server type=tcp,fd=, -f). Exactly one
// of Listener and Conn is set.
type Endpoint struct {
	Listener net.Listener
	Conn     net.Conn
	// Path is the unix socket file created for the listener, removed by Close.
	Path string
}

// Close closes the listener or connection and removes a socket file nkp-swtpm created.
func (e *Endpoint) Close() error {
	if e == nil {
		return nil
	}
	var err error
	if e.Listener != nil {
		err = e.Listener.Close()
	}
	if e.Conn != nil {
		err = e.Conn.Close()
	}
	if e.Path != "" {
		if rerr := os.Remove(e.Path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) && err == nil {
			err = rerr
		}
	}
	return err
}

// openChannel creates or adopts the socket a Channel describes. option names the
// command-line option ("ctrl" or "server") for error messages.
func openChannel(c *cmdline.Channel, option string) (*Endpoint, error) {
	switch {
	case c.ConnFD >= 0:
		f := os.NewFile(uintptr(c.ConnFD), option+"-conn")
		conn, err := net.FileConn(f)
		f.Close() // FileConn dups the fd
		if err != nil {
			return nil, fmt.Errorf("--%s: fd %d is not a connected socket: %w (pass a socket the parent keeps open)", option, c.ConnFD, err)
		}
		return &Endpoint{Conn: conn}, nil
	case c.ListenFD >= 0:
		f := os.NewFile(uintptr(c.ListenFD), option+"-listener")
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("--%s: fd %d is not a listening socket: %w (pass a socket after listen(2))", option, c.ListenFD, err)
		}
		return &Endpoint{Listener: l}, nil
	case c.Type == cmdline.TypeUnixIO:
		return openUnix(option, c)
	default:
		addr, err := tcpAddr(c)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", option, err)
		}
		l, err := net.ListenTCP("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("--%s: listen on %s: %w (is the port in use?)", option, addr, err)
		}
		return &Endpoint{Listener: l}, nil
	}
}

// tcpAddr is the address a TCP channel listens on. bindaddr= must be an IPv4 or IPv6
// address, as for swtpm (inet_pton): a host name is refused rather than looked up,
// which also keeps Go's DNS resolver out of the binary (BENCHMARKS.md, vTPM memory).
// ifname= is the zone of an IPv6 link-local address.
func tcpAddr(c *cmdline.Channel) (*net.TCPAddr, error) {
	ip, err := netip.ParseAddr(c.BindAddr)
	if err != nil {
		return nil, fmt.Errorf("bindaddr=%s is not an IPv4 or IPv6 address (host names are not looked up, as by swtpm): give an address such as 127.0.0.1 or ::1", c.BindAddr)
	}
	zone := ip.Zone()
	if c.IfName != "" {
		zone = c.IfName
	}
	return &net.TCPAddr{IP: ip.WithZone("").AsSlice(), Port: c.Port, Zone: zone}, nil
}

func openUnix(option string, c *cmdline.Channel) (*Endpoint, error) {
	uid, gid, err := owner(c.UID, c.GID)
	if err != nil {
		return nil, fmt.Errorf("--%s: %w", option, err)
	}
	// Like swtpm: a stale socket file from an earlier run is replaced.
	if err := os.Remove(c.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("--%s: remove stale %s: %w", option, c.Path, err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: c.Path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("--%s: listen on %s: %w (does the directory exist and is it writable?)", option, c.Path, err)
	}
	l.SetUnlinkOnClose(false) // Endpoint.Close removes it
	ep := &Endpoint{Listener: l, Path: c.Path}
	if err := os.Chmod(c.Path, c.Mode); err != nil {
		ep.Close()
		return nil, fmt.Errorf("--%s: chmod %s to %#o: %w", option, c.Path, c.Mode, err)
	}
	if uid >= 0 || gid >= 0 {
		if err := os.Chown(c.Path, uid, gid); err != nil {
			ep.Close()
			return nil, fmt.Errorf("--%s: chown %s to %d:%d: %w (needs root or group membership)", option, c.Path, uid, gid, err)
		}
	}
	return ep, nil
}

// owner resolves uid= and gid= (numbers or names); -1 keeps the current owner.
func owner(u, g string) (uid, gid int, err error) {
	uid, gid = -1, -1
	if u != "" {
		if n, err := strconv.Atoi(u); err == nil {
			uid = n
		} else if usr, err := user.Lookup(u); err == nil {
			uid, _ = strconv.Atoi(usr.Uid)
		} else {
			return 0, 0, fmt.Errorf("uid=%s: no such user: %w", u, err)
		}
	}
	if g != "" {
		if n, err := strconv.Atoi(g); err == nil {
			gid = n
		} else if grp, err := user.LookupGroup(g); err == nil {
			gid, _ = strconv.Atoi(grp.Gid)
		} else {
			return 0, 0, fmt.Errorf("gid=%s: no such group: %w", g, err)
		}
	}
	return uid, gid, nil
}

// envStatusFD names an inherited listening unix socket for nkp's status channel
// (swtpm.Config.StatusListener), which nkp-hostd passes to ask whether a running VM's
// vTPM answers. An fd number, nothing secret; not carried across -d.
const envStatusFD = "NKP_SWTPM_STATUS_FD"

// statusListener returns the status channel's listener, or nil without envStatusFD. The
// variable is removed so that nothing started later inherits it.
func statusListener(getenv func(string) string) (net.Listener, error) {
	v := getenv(envStatusFD)
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(envStatusFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: want the number of an inherited listening socket (3 or more)", envStatusFD, v)
	}
	f := os.NewFile(uintptr(fd), "status-listener")
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("%s=%d: not a listening socket: %w", envStatusFD, fd, err)
	}
	return l, nil
}
