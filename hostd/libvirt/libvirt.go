// Package libvirt is hostd's connection to libvirtd through libvirt.org/go/libvirt: the
// domain definitions, states, secrets and QEMU monitor queries that the VM operations
// (hostd/vm's Libvirt interface) need. Lifecycle events belong here too.
//
// hostd never uses it while answering a hook (libvirt documents that calling back from
// a hook can deadlock); the VM operations run from the local API.
//
// Importers: hostd, cmd/nkp-hostd, tests. cgo (libvirt's client library).
package libvirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/vm"
)

// Conn is a connection to libvirtd. It is safe for concurrent use.
type Conn struct {
	c   *golibvirt.Connect
	uri string
}

// Open connects to libvirtd at uri (qemu:///system).
func Open(uri string) (*Conn, error) {
	c, err := golibvirt.NewConnect(uri)
	if err != nil {
		return nil, fmt.Errorf("libvirt %s: %w (is libvirtd running?)", uri, err)
	}
	return &Conn{c: c, uri: uri}, nil
}

// Close closes the connection.
func (c *Conn) Close() error {
	_, err := c.c.Close()
	return err
}

// domain looks a domain up by UUID (when domain is one) or by name.
func (c *Conn) domain(ctx context.Context, domain string) (*golibvirt.Domain, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var d *golibvirt.Domain
	var err error
	if _, perr := uuid.Parse(domain); perr == nil && len(domain) == 36 {
		d, err = c.c.LookupDomainByUUIDString(domain)
	} else {
		d, err = c.c.LookupDomainByName(domain)
	}
	if err != nil {
		var le golibvirt.Error
		if errors.As(err, &le) && le.Code == golibvirt.ERR_NO_DOMAIN {
			return nil, fmt.Errorf("libvirt %s: domain %q: %w", c.uri, domain, vm.ErrNoDomain)
		}
		return nil, fmt.Errorf("libvirt %s: domain %q: %w", c.uri, domain, err)
	}
	return d, nil
}

// DomainXML returns the domain's persistent definition with its secure parts
// (virsh dumpxml --inactive --security-info).
func (c *Conn) DomainXML(ctx context.Context, domain string) ([]byte, error) {
	d, err := c.domain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer d.Free()
	x, err := d.GetXMLDesc(golibvirt.DOMAIN_XML_INACTIVE | golibvirt.DOMAIN_XML_SECURE)
	if err != nil {
		return nil, fmt.Errorf("libvirt %s: domain %q: reading its definition: %w", c.uri, domain, err)
	}
	return []byte(x), nil
}

// DefineXML defines (or replaces) a persistent domain.
func (c *Conn) DefineXML(ctx context.Context, x []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d, err := c.c.DomainDefineXML(string(x))
	if err != nil {
		return fmt.Errorf("libvirt %s: define: %w", c.uri, err)
	}
	return d.Free()
}

// IsActive says whether the domain runs (or is paused).
func (c *Conn) IsActive(ctx context.Context, domain string) (bool, error) {
	d, err := c.domain(ctx, domain)
	if err != nil {
		return false, err
	}
	defer d.Free()
	return d.IsActive()
}

// Domains lists the UUIDs of the persistent domains.
func (c *Conn) Domains(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ds, err := c.c.ListAllDomains(golibvirt.CONNECT_LIST_DOMAINS_PERSISTENT)
	if err != nil {
		return nil, fmt.Errorf("libvirt %s: listing domains: %w", c.uri, err)
	}
	var out []string
	for i := range ds {
		if u, err := ds[i].GetUUIDString(); err == nil {
			out = append(out, u)
		}
		ds[i].Free()
	}
	return out, nil
}

// SecretValue returns a libvirt secret's value; the caller wipes it.
func (c *Conn) SecretValue(ctx context.Context, secretUUID string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s, err := c.c.LookupSecretByUUIDString(secretUUID)
	if err != nil {
		return nil, fmt.Errorf("libvirt %s: secret %s: %w", c.uri, secretUUID, err)
	}
	defer s.Free()
	v, err := s.GetValue(0)
	if err != nil {
		return nil, fmt.Errorf("libvirt %s: secret %s: reading its value: %w (a private secret cannot be read back)", c.uri, secretUUID, err)
	}
	return v, nil
}

// TPMCheck asks the running domain's QEMU (query-tpm through libvirt's monitor
// passthrough) whether it has a TPM device with a backend.
func (c *Conn) TPMCheck(ctx context.Context, domain string) error {
	d, err := c.domain(ctx, domain)
	if err != nil {
		return err
	}
	defer d.Free()
	out, err := d.QemuMonitorCommand(`{"execute":"query-tpm"}`, golibvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
	if err != nil {
		return fmt.Errorf("QEMU monitor: %w", err)
	}
	var r struct {
		Return []struct {
			Model   string `json:"model"`
			Options struct {
				Type string `json:"type"`
			} `json:"options"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return fmt.Errorf("QEMU monitor: query-tpm: %w", err)
	}
	if len(r.Return) == 0 {
		return errors.New("QEMU has no TPM device")
	}
	var kinds []string
	for _, t := range r.Return {
		kinds = append(kinds, t.Model+"/"+t.Options.Type)
	}
	if r.Return[0].Options.Type == "" {
		return fmt.Errorf("QEMU's TPM device %s has no backend", strings.Join(kinds, ", "))
	}
	return nil
}

var _ vm.Libvirt = (*Conn)(nil)
