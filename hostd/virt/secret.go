package virt

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"strings"

	"libvirt.org/go/libvirt"

	"github.com/nkp-dev/nkp/provider/kdk"
)

// SecretPrefix starts the description of every libvirt secret nkp defines; ListSecrets
// recognises nkp's secrets by it.
const SecretPrefix = "nkp: "

// Secret is a libvirt secret as nkp defines it: ephemeral (libvirtd keeps it in memory
// only, so /etc/libvirt/secrets never holds it and it is gone after libvirtd restarts)
// and private (libvirtd never hands its value out: virsh secret-get-value is refused).
type Secret struct {
	UUID string
	// Description must start with SecretPrefix.
	Description string
}

// SecretInfo is a libvirt secret as ListSecrets reads it.
type SecretInfo struct {
	UUID, Description  string
	Ephemeral, Private bool
}

// secretXML is the definition of s: ephemeral, private, no usage element (a disk's
// <encryption><secret type='passphrase' uuid=…/> finds it by UUID).
func secretXML(s Secret) (string, error) {
	if err := kdk.CheckUUID(s.UUID); err != nil {
		return "", fmt.Errorf("libvirt secret: %w", err)
	}
	if !strings.HasPrefix(s.Description, SecretPrefix) {
		return "", fmt.Errorf("libvirt secret %s: description %q does not start with %q", s.UUID, s.Description, SecretPrefix)
	}
	var desc bytes.Buffer
	if err := xml.EscapeText(&desc, []byte(s.Description)); err != nil {
		return "", err
	}
	return "<secret ephemeral='yes' private='yes'><uuid>" + s.UUID + "</uuid><description>" + desc.String() + "</description></secret>", nil
}

// DefineSecret defines s as an ephemeral, private libvirt secret (or defines it again:
// the same UUID is replaced) and sets its value. The caller wipes value; the copy made
// for libvirt's C API is wiped here. The secret events of this call are not delivered
// on Events (they are this process's own).
//
// A secret with s's UUID that is persistent or public (someone else's) is undefined
// first, which removes its files.
func (c *Conn) DefineSecret(_ context.Context, s Secret, value []byte) error {
	def, err := secretXML(s)
	if err != nil {
		return err
	}
	conn, err := c.get()
	if err != nil {
		return err
	}
	// A secret of this UUID that is persistent or public is undefined first: libvirt 9
	// redefines a persistent secret as ephemeral but leaves its file in
	// /etc/libvirt/secrets (it would come back at the next libvirtd start).
	if old, err := conn.LookupSecretByUUIDString(s.UUID); err == nil {
		x, xerr := old.GetXMLDesc(0)
		old.Free()
		if info, perr := parseSecret([]byte(x)); xerr == nil && perr == nil && (!info.Ephemeral || !info.Private) {
			if err := c.UndefineSecret(context.Background(), s.UUID); err != nil {
				return fmt.Errorf("libvirt secret %s: undefining the persistent or public secret of that UUID: %w", s.UUID, err)
			}
		}
	}
	c.expect(s.UUID, secretDefined)
	sec, err := conn.SecretDefineXML(def, 0)
	if err != nil {
		c.unexpect(s.UUID, secretDefined)
		return fmt.Errorf("libvirt secret %s: define: %w", s.UUID, err)
	}
	sec.Free()
	c.expect(s.UUID, secretValue)
	if err := setSecretValue(conn, s.UUID, value); err != nil {
		c.unexpect(s.UUID, secretValue)
		return fmt.Errorf("libvirt secret %s: set value: %w", s.UUID, err)
	}
	return nil
}

// UndefineSecret undefines the secret uuid; one already gone is not an error.
func (c *Conn) UndefineSecret(_ context.Context, uuid string) error {
	conn, err := c.get()
	if err != nil {
		return err
	}
	sec, err := conn.LookupSecretByUUIDString(uuid)
	if isCode(err, libvirt.ERR_NO_SECRET) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("libvirt secret %s: %w", uuid, err)
	}
	defer sec.Free()
	c.expect(uuid, secretUndefined)
	if err := sec.Undefine(); err != nil {
		c.unexpect(uuid, secretUndefined)
		if isCode(err, libvirt.ERR_NO_SECRET) {
			return nil
		}
		return fmt.Errorf("libvirt secret %s: undefine: %w", uuid, err)
	}
	return nil
}

// SecretExists says whether libvirt holds a secret of that UUID.
func (c *Conn) SecretExists(_ context.Context, uuid string) (bool, error) {
	conn, err := c.get()
	if err != nil {
		return false, err
	}
	sec, err := conn.LookupSecretByUUIDString(uuid)
	if isCode(err, libvirt.ERR_NO_SECRET) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("libvirt secret %s: %w", uuid, err)
	}
	sec.Free()
	return true, nil
}

// ListSecrets returns nkp's libvirt secrets: those whose description starts with
// SecretPrefix.
func (c *Conn) ListSecrets(_ context.Context) ([]SecretInfo, error) {
	conn, err := c.get()
	if err != nil {
		return nil, err
	}
	secs, err := conn.ListAllSecrets(0)
	if err != nil {
		return nil, fmt.Errorf("list libvirt secrets: %w", err)
	}
	var out []SecretInfo
	for i := range secs {
		x, err := secs[i].GetXMLDesc(0)
		secs[i].Free()
		if err != nil {
			continue // undefined meanwhile
		}
		info, err := parseSecret([]byte(x))
		if err != nil {
			return nil, fmt.Errorf("list libvirt secrets: %w", err)
		}
		if strings.HasPrefix(info.Description, SecretPrefix) {
			out = append(out, info)
		}
	}
	return out, nil
}

// parseSecret reads libvirt's <secret> XML.
func parseSecret(b []byte) (SecretInfo, error) {
	var s struct {
		Ephemeral   string `xml:"ephemeral,attr"`
		Private     string `xml:"private,attr"`
		UUID        string `xml:"uuid"`
		Description string `xml:"description"`
	}
	if err := xml.Unmarshal(b, &s); err != nil {
		return SecretInfo{}, fmt.Errorf("libvirt secret XML: %w", err)
	}
	return SecretInfo{UUID: strings.TrimSpace(s.UUID), Description: s.Description, Ephemeral: s.Ephemeral == "yes", Private: s.Private == "yes"}, nil
}

// Kinds of this process's own secret operations, whose events Events does not deliver.
const (
	secretDefined = iota
	secretValue
	secretUndefined
)

type ownOp struct {
	uuid string
	kind int
}

// expect notes that an operation of this process will cause the event (uuid, kind).
func (c *Conn) expect(uuid string, kind int) {
	c.ownMu.Lock()
	if c.own == nil {
		c.own = map[ownOp]int{}
	}
	c.own[ownOp{uuid, kind}]++
	c.ownMu.Unlock()
}

// unexpect takes back an expect whose operation failed.
func (c *Conn) unexpect(uuid string, kind int) { c.isOwn(uuid, kind) }

// isOwn consumes one expected event (uuid, kind) and says whether there was one.
func (c *Conn) isOwn(uuid string, kind int) bool {
	c.ownMu.Lock()
	defer c.ownMu.Unlock()
	k := ownOp{uuid, kind}
	if c.own[k] == 0 {
		return false
	}
	if c.own[k]--; c.own[k] == 0 {
		delete(c.own, k)
	}
	return true
}

// resetOwn forgets expected events (a new connection: the old one's never come).
func (c *Conn) resetOwn() {
	c.ownMu.Lock()
	c.own = nil
	c.ownMu.Unlock()
}

// registerSecretEvents delivers other processes' changes of secrets: SecretChanged for a
// definition or a value set, SecretUndefined for an undefine.
func (c *Conn) registerSecretEvents(conn *libvirt.Connect) error {
	_, err := conn.SecretEventLifecycleRegister(nil, func(_ *libvirt.Connect, s *libvirt.Secret, ev *libvirt.SecretEventLifecycle) {
		uuid, _ := s.GetUUIDString()
		switch ev.Event {
		case libvirt.SECRET_EVENT_DEFINED:
			if !c.isOwn(uuid, secretDefined) {
				c.send(Event{Kind: SecretChanged, UUID: uuid})
			}
		case libvirt.SECRET_EVENT_UNDEFINED:
			if !c.isOwn(uuid, secretUndefined) {
				c.send(Event{Kind: SecretUndefined, UUID: uuid})
			}
		}
	})
	if err != nil {
		return fmt.Errorf("secret lifecycle events: %w", err)
	}
	_, err = conn.SecretEventValueChangedRegister(nil, func(_ *libvirt.Connect, s *libvirt.Secret) {
		uuid, _ := s.GetUUIDString()
		if !c.isOwn(uuid, secretValue) {
			c.send(Event{Kind: SecretChanged, UUID: uuid})
		}
	})
	if err != nil {
		return fmt.Errorf("secret value events: %w", err)
	}
	return nil
}
