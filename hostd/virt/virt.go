// Package virt is hostd's adapter to libvirt (libvirt.org/go/libvirt, cgo): the domain
// operations hostd/vm needs (its Libvirt interface), the domain state and definitions
// hostd's reconciles read, the libvirt secrets of protected disks, and the events that
// tell hostd about domains whose hooks it missed and secrets others changed.
//
// Open connects and runs libvirt's default event loop in a goroutine. When libvirtd goes
// away (restart) a Disconnected event is delivered at once, the connection is re-opened
// in the background, the callbacks registered again, and a Reconnected event delivered
// so that hostd reconciles everything. Callers never call into this package while
// answering a libvirt hook.
//
// Secrets: DefineSecret defines <secret ephemeral='yes' private='yes'> with a UUID and a
// description starting with SecretPrefix ("nkp: "), no usage element (a disk's
// <encryption> names it by UUID), and sets its value. Ephemeral: libvirtd keeps it in
// memory only, so /etc/libvirt/secrets never holds it, and it is gone when libvirtd
// restarts (hostd defines it again on Reconnected). Private: libvirtd never returns its
// value (virsh secret-get-value fails with "secret is private"). A persistent or public
// secret of the same UUID is undefined first (libvirt 9 would leave a persistent one's
// file behind). The value is handed to virSecretSetValue by a small cgo function of this
// package, because the binding's SetValue copies it into a Go buffer it never wipes.
// SecretValue reads another secret's value (a vTPM's <encryption secret=…> that protect
// adopts): a private one, which libvirt hands to no client, from libvirt's secret store
// when it is persistent (SystemSecretsDir/<uuid>.base64, for a system URI); a private
// ephemeral one is refused with what to do.
// ListSecrets returns nkp's secrets (by the description prefix). SecretChanged and
// SecretUndefined events report other processes' changes only: the events of this
// Conn's own DefineSecret and UndefineSecret are recognised and not delivered.
//
// Importers: hostd and its subpackages. The only cgo in hostd.
package virt

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/nkp-dev/nkp/hostd/vm"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// EventKind is what happened to a domain.
type EventKind int

// Event kinds.
const (
	Stopped      EventKind = iota + 1 // the domain stopped (shutdown, destroy, crash, saved, migrated away, failed start)
	Started                           // the domain started (boot, restore, migrated in)
	Other                             // any other lifecycle change
	Reconnected                       // the connection to libvirtd was (re)established: reconcile everything
	Defined                           // the domain was defined (new or changed persistent definition)
	Undefined                         // the domain was undefined
	Disconnected                      // the connection to libvirtd was lost (ephemeral secrets are gone if libvirtd restarts)
	// SecretChanged: another process defined a secret or set its value (UUID is the
	// secret's). This process's own DefineSecret causes no event.
	SecretChanged
	// SecretUndefined: another process undefined a secret (UUID is the secret's).
	SecretUndefined
)

// Event is one lifecycle event.
type Event struct {
	Kind EventKind
	UUID string // the domain's, or the secret's for the Secret kinds; "" for Reconnected and Disconnected
	Name string // the domain's
}

var eventLoop sync.Once

// Conn is a libvirt connection that re-opens itself.
type Conn struct {
	uri string
	log *slog.Logger
	// secretsDir is libvirtd's persistent secret store (SystemSecretsDir for a system
	// URI, "" otherwise): SecretValue reads a private secret's value there.
	secretsDir string
	events     chan Event

	mu   sync.Mutex
	conn *libvirt.Connect // nil while disconnected; guarded by mu
	lost chan struct{}    // closed by the close callback of conn

	ownMu sync.Mutex
	own   map[ownOp]int // secret events this process's own calls will cause; guarded by ownMu
}

// Open connects to uri (qemu:///system) and starts delivering events. It fails only if
// the first connection fails; later losses are repaired in the background until ctx ends.
func Open(ctx context.Context, uri string, log *slog.Logger) (*Conn, error) {
	var loopErr error
	eventLoop.Do(func() {
		if loopErr = libvirt.EventRegisterDefaultImpl(); loopErr != nil {
			return
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					log.Warn("libvirt event loop", "err", err)
					time.Sleep(100 * time.Millisecond) // an error here repeats at once otherwise
				}
			}
		}()
	})
	if loopErr != nil {
		return nil, fmt.Errorf("libvirt event loop: %w", loopErr)
	}
	c := &Conn{uri: uri, log: log, events: make(chan Event, 256)}
	if strings.HasSuffix(uri, ":///system") {
		c.secretsDir = SystemSecretsDir
	}
	if err := c.connect(); err != nil {
		return nil, err
	}
	go c.keep(ctx)
	return c, nil
}

// Events delivers lifecycle events (dropped, with a warning, when the consumer lags; a
// Reconnected or the periodic reconcile catches up).
func (c *Conn) Events() <-chan Event { return c.events }

func (c *Conn) connect() error {
	conn, err := libvirt.NewConnect(c.uri)
	if err != nil {
		return fmt.Errorf("libvirt %s: %w", c.uri, err)
	}
	lost := make(chan struct{})
	var once sync.Once
	if err := conn.RegisterCloseCallback(func(*libvirt.Connect, libvirt.ConnectCloseReason) { once.Do(func() { close(lost) }) }); err != nil {
		conn.Close()
		return fmt.Errorf("libvirt %s: close callback: %w", c.uri, err)
	}
	if err := conn.SetKeepAlive(5, 3); err != nil {
		c.log.Debug("libvirt keepalive not set", "err", err)
	}
	_, err = conn.DomainEventLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventLifecycle) {
		uuid, _ := d.GetUUIDString()
		name, _ := d.GetName()
		kind := Other
		switch ev.Event {
		case libvirt.DOMAIN_EVENT_STOPPED:
			kind = Stopped
		case libvirt.DOMAIN_EVENT_STARTED:
			kind = Started
		case libvirt.DOMAIN_EVENT_DEFINED:
			kind = Defined
		case libvirt.DOMAIN_EVENT_UNDEFINED:
			kind = Undefined
		}
		c.send(Event{Kind: kind, UUID: uuid, Name: name})
	})
	if err != nil {
		conn.UnregisterCloseCallback()
		conn.Close()
		return fmt.Errorf("libvirt %s: lifecycle events: %w", c.uri, err)
	}
	if err := c.registerSecretEvents(conn); err != nil {
		conn.UnregisterCloseCallback()
		conn.Close()
		return fmt.Errorf("libvirt %s: %w", c.uri, err)
	}
	c.resetOwn()
	c.mu.Lock()
	c.conn, c.lost = conn, lost
	c.mu.Unlock()
	c.send(Event{Kind: Reconnected})
	return nil
}

func (c *Conn) send(e Event) {
	select {
	case c.events <- e:
	default:
		c.log.Warn("libvirt event dropped: hostd is behind", "uuid", e.UUID)
	}
}

// keep re-opens the connection whenever libvirtd closes it.
func (c *Conn) keep(ctx context.Context) {
	for {
		c.mu.Lock()
		lost := c.lost
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			c.mu.Lock()
			if c.conn != nil {
				c.conn.Close()
				c.conn = nil
			}
			c.mu.Unlock()
			return
		case <-lost:
		}
		c.log.Warn("lost the connection to libvirtd: reconnecting", "uri", c.uri)
		c.send(Event{Kind: Disconnected})
		c.mu.Lock()
		if c.conn != nil {
			c.conn.Close()
			c.conn = nil
		}
		c.mu.Unlock()
		for delay := 100 * time.Millisecond; ; delay = min(delay*2, 5*time.Second) {
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			if err := c.connect(); err == nil {
				c.log.Info("connected to libvirtd again", "uri", c.uri)
				break
			}
		}
	}
}

func (c *Conn) get() (*libvirt.Connect, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil, fmt.Errorf("libvirt %s: not connected (libvirtd restarting?)", c.uri)
	}
	return c.conn, nil
}

func isCode(err error, code libvirt.ErrorNumber) bool {
	var le libvirt.Error
	return errors.As(err, &le) && le.Code == code
}

func (c *Conn) lookup(domain string) (*libvirt.Domain, error) {
	conn, err := c.get()
	if err != nil {
		return nil, err
	}
	var d *libvirt.Domain
	if kdk.CheckUUID(strings.ToLower(domain)) == nil {
		d, err = conn.LookupDomainByUUIDString(domain)
	} else {
		d, err = conn.LookupDomainByName(domain)
	}
	if isCode(err, libvirt.ERR_NO_DOMAIN) {
		return nil, fmt.Errorf("domain %q: %w", domain, vm.ErrNoDomain)
	}
	if err != nil {
		return nil, fmt.Errorf("domain %q: %w", domain, err)
	}
	return d, nil
}

// DomainXML implements vm.Libvirt: the persistent definition with secure fields.
func (c *Conn) DomainXML(_ context.Context, domain string) ([]byte, error) {
	d, err := c.lookup(domain)
	if err != nil {
		return nil, err
	}
	defer d.Free()
	x, err := d.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE | libvirt.DOMAIN_XML_SECURE)
	if err != nil {
		return nil, fmt.Errorf("domain %q: %w", domain, err)
	}
	return []byte(x), nil
}

// DefineXML implements vm.Libvirt.
func (c *Conn) DefineXML(_ context.Context, xml []byte) error {
	conn, err := c.get()
	if err != nil {
		return err
	}
	d, err := conn.DomainDefineXML(string(xml))
	if err != nil {
		return fmt.Errorf("define: %w", err)
	}
	d.Free()
	return nil
}

// Lifecycle implements vm.Libvirt: one lookup, three questions.
func (c *Conn) Lifecycle(_ context.Context, domain string) (vm.Lifecycle, error) {
	d, err := c.lookup(domain)
	if err != nil {
		return vm.Lifecycle{}, err
	}
	defer d.Free()
	var lc vm.Lifecycle
	if lc.Active, err = d.IsActive(); err != nil {
		return vm.Lifecycle{}, fmt.Errorf("domain %q: is it active: %w", domain, err)
	}
	if lc.Persistent, err = d.IsPersistent(); err != nil {
		return vm.Lifecycle{}, fmt.Errorf("domain %q: is it persistent: %w", domain, err)
	}
	if lc.ManagedSave, err = d.HasManagedSaveImage(0); err != nil {
		return vm.Lifecycle{}, fmt.Errorf("domain %q: has it a managed save image: %w", domain, err)
	}
	return lc, nil
}

// Domains implements vm.Libvirt: the UUIDs of the persistent domains.
func (c *Conn) Domains(_ context.Context) ([]string, error) {
	conn, err := c.get()
	if err != nil {
		return nil, err
	}
	ds, err := conn.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_PERSISTENT)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var out []string
	for _, d := range ds {
		if u, err := d.GetUUIDString(); err == nil {
			out = append(out, u)
		}
		d.Free()
	}
	return out, nil
}

// SecretValue implements vm.Libvirt.
func (c *Conn) SecretValue(_ context.Context, secretUUID string) ([]byte, error) {
	conn, err := c.get()
	if err != nil {
		return nil, err
	}
	s, err := conn.LookupSecretByUUIDString(secretUUID)
	if err != nil {
		return nil, fmt.Errorf("libvirt secret %s: %w", secretUUID, err)
	}
	defer s.Free()
	v, err := s.GetValue(0)
	if err == nil {
		return v, nil
	}
	if !isCode(err, libvirt.ERR_INVALID_SECRET) || !strings.Contains(err.Error(), "private") {
		return nil, fmt.Errorf("libvirt secret %s: %w", secretUUID, err)
	}
	// A private secret: libvirt hands its value to its own swtpm but to no API client.
	// A persistent one's value is in libvirt's secret store, which root may read.
	desc, xerr := s.GetXMLDesc(0)
	info, perr := parseSecret([]byte(desc))
	switch {
	case xerr != nil || perr != nil:
		return nil, fmt.Errorf("libvirt secret %s: %w (and its definition cannot be read: %w)", secretUUID, err, errors.Join(xerr, perr))
	case info.Ephemeral || c.secretsDir == "":
		return nil, fmt.Errorf("libvirt secret %s is private and ephemeral: libvirt hands its value to no client and keeps no file of it, so nkp cannot read it: define it again with private='no' and the same value (virsh secret-undefine %s, virsh secret-define, virsh secret-set-value)", secretUUID, secretUUID)
	}
	v, ferr := readSecretFile(c.secretsDir, secretUUID)
	if ferr != nil {
		return nil, fmt.Errorf("libvirt secret %s is private (libvirt hands its value to no client), and reading its value from libvirt's secret store failed: %w; define it again with private='no' and the same value (virsh secret-undefine %s, virsh secret-define, virsh secret-set-value)", secretUUID, ferr, secretUUID)
	}
	c.log.Info("read a private libvirt secret's value from libvirt's secret store", "secret", secretUUID, "dir", c.secretsDir)
	return v, nil
}

// SystemSecretsDir is where libvirtd's system instance (qemu:///system) keeps persistent
// secrets: <uuid>.xml and <uuid>.base64, the value base64-encoded, root's, 0600.
const SystemSecretsDir = "/etc/libvirt/secrets"

// readSecretFile reads a persistent secret's value from libvirt's secret store dir
// (dir/<uuid>.base64): a regular file, not a link, at most 64 KiB. The caller wipes it.
func readSecretFile(dir, secretUUID string) ([]byte, error) {
	secretUUID = strings.ToLower(secretUUID)
	if err := kdk.CheckUUID(secretUUID); err != nil {
		return nil, err
	}
	name := filepath.Join(dir, secretUUID+".base64")
	f, err := os.OpenFile(name, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, err
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", name)
	}
	enc, err := io.ReadAll(io.LimitReader(f, 64<<10+1))
	defer clear(enc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(enc) > 64<<10 {
		return nil, fmt.Errorf("%s: larger than 64 KiB", name)
	}
	enc = bytes.TrimSpace(enc)
	v := make([]byte, base64.StdEncoding.DecodedLen(len(enc)))
	n, err := base64.StdEncoding.Decode(v, enc)
	if err != nil {
		clear(v)
		return nil, fmt.Errorf("%s: not base64: %w", name, err)
	}
	if n == 0 {
		clear(v)
		return nil, fmt.Errorf("%s: the secret has no value", name)
	}
	return v[:n], nil
}

// TPMCheck implements vm.Libvirt: QEMU reports a TPM device with the emulator backend.
func (c *Conn) TPMCheck(_ context.Context, domain string) error {
	d, err := c.lookup(domain)
	if err != nil {
		return err
	}
	defer d.Free()
	out, err := d.QemuMonitorCommand(`{"execute":"query-tpm"}`, libvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
	if err != nil {
		return fmt.Errorf("domain %q: query-tpm: %w", domain, err)
	}
	if !strings.Contains(out, `"emulator"`) {
		return fmt.Errorf("domain %q: QEMU reports no emulator TPM (%s)", domain, out)
	}
	return nil
}

// DiskEncryption implements vm.Libvirt: for each disk of a running domain, whether QEMU
// opened it encrypted (QMP query-block, matched to the live XML's aliases by
// vm.BlockEncrypted). Added by the disk-vm helper for nkpctl vm status.
func (c *Conn) DiskEncryption(_ context.Context, domain string) (map[string]bool, error) {
	d, err := c.lookup(domain)
	if err != nil {
		return nil, err
	}
	defer d.Free()
	x, err := d.GetXMLDesc(0)
	if err != nil {
		return nil, fmt.Errorf("domain %q: %w", domain, err)
	}
	out, err := d.QemuMonitorCommand(`{"execute":"query-block"}`, libvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
	if err != nil {
		return nil, fmt.Errorf("domain %q: query-block: %w", domain, err)
	}
	return vm.BlockEncrypted([]byte(x), []byte(out))
}

// State is what reconcile needs to know about a domain.
type State struct {
	Known, Active bool
	XML           []byte // the live definition when active, else the persistent one; nil if unknown
}

// DomainState reads a domain's state by UUID.
func (c *Conn) DomainState(_ context.Context, uuid string) (State, error) {
	d, err := c.lookup(uuid)
	if errors.Is(err, vm.ErrNoDomain) {
		return State{}, nil
	}
	if err != nil {
		return State{}, err
	}
	defer d.Free()
	active, err := d.IsActive()
	if err != nil {
		return State{}, fmt.Errorf("domain %s: %w", uuid, err)
	}
	x, err := d.GetXMLDesc(0)
	if err != nil {
		return State{}, fmt.Errorf("domain %s: %w", uuid, err)
	}
	return State{Known: true, Active: active, XML: []byte(x)}, nil
}

// Definition is what libvirt holds of one domain: its persistent definition and, while
// it runs, its live one (they differ after a change that applies at the next start).
type Definition struct {
	UUID, Name string
	Active     bool
	Inactive   []byte // the persistent definition; nil for a transient domain
	Live       []byte // the running definition; nil when the domain is not active
}

// Definitions returns every domain libvirt knows (persistent or transient, running or
// not) with its definitions. A domain that disappears while it is read is left out.
func (c *Conn) Definitions(_ context.Context) ([]Definition, error) {
	conn, err := c.get()
	if err != nil {
		return nil, err
	}
	ds, err := conn.ListAllDomains(0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var out []Definition
	for i := range ds {
		def, err := definition(&ds[i])
		ds[i].Free()
		if isCode(err, libvirt.ERR_NO_DOMAIN) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, def)
	}
	return out, nil
}

// Definition returns the definitions of the domain uuid; ok is false when libvirt does
// not know it.
func (c *Conn) Definition(_ context.Context, uuid string) (_ Definition, ok bool, _ error) {
	d, err := c.lookup(uuid)
	if errors.Is(err, vm.ErrNoDomain) {
		return Definition{}, false, nil
	}
	if err != nil {
		return Definition{}, false, err
	}
	defer d.Free()
	def, err := definition(d)
	if isCode(err, libvirt.ERR_NO_DOMAIN) {
		return Definition{}, false, nil
	}
	return def, err == nil, err
}

func definition(d *libvirt.Domain) (Definition, error) {
	var def Definition
	var err error
	if def.UUID, err = d.GetUUIDString(); err != nil {
		return def, err
	}
	if def.Name, err = d.GetName(); err != nil {
		return def, err
	}
	persistent, err := d.IsPersistent()
	if err != nil {
		return def, fmt.Errorf("domain %s: %w", def.UUID, err)
	}
	if def.Active, err = d.IsActive(); err != nil {
		return def, fmt.Errorf("domain %s: %w", def.UUID, err)
	}
	if persistent {
		x, err := d.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
		if err != nil {
			return def, fmt.Errorf("domain %s: %w", def.UUID, err)
		}
		def.Inactive = []byte(x)
	}
	if def.Active {
		x, err := d.GetXMLDesc(0)
		if err != nil {
			if isCode(err, libvirt.ERR_OPERATION_INVALID) { // stopped meanwhile
				def.Active = false
				return def, nil
			}
			return def, fmt.Errorf("domain %s: %w", def.UUID, err)
		}
		def.Live = []byte(x)
	}
	return def, nil
}

// Close closes the connection (the event loop goroutine stays: it is per process).
func (c *Conn) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.UnregisterCloseCallback()
		c.conn.Close()
		c.conn = nil
	}
}

var _ vm.Libvirt = (*Conn)(nil)
