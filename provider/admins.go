package provider

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// bucketAdmins holds one adminRecord per issued admin certificate, keyed by its hex
// serial.
const bucketAdmins = "admins"

// adminRecord is an issued administrator certificate.
type adminRecord struct {
	Name     string     `json:"name"`
	Serial   string     `json:"serial"`
	Issued   time.Time  `json:"issued"`
	NotAfter time.Time  `json:"not_after"`
	Revoked  *time.Time `json:"revoked,omitempty"`
}

func (r adminRecord) public() Admin {
	a := Admin{Name: r.Name, Serial: r.Serial, Issued: r.Issued, NotAfter: r.NotAfter}
	if r.Revoked != nil {
		a.Revoked = *r.Revoked
	}
	return a
}

// active reports whether the certificate still lets its holder in at now.
func (r adminRecord) active(now time.Time) bool {
	return r.Revoked == nil && now.Before(r.NotAfter)
}

func listAdmins(tx store.Tx) ([]adminRecord, error) {
	out, err := listJSON[adminRecord](tx, bucketAdmins, "", "admin certificates")
	if err != nil {
		return nil, err
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Issued.Before(out[j].Issued) })
	return out, nil
}

// Admins lists the administrator certificates issued (by init, restore or `admins add`),
// revoked ones included, oldest first. Certificates issued before nkp kept this record
// are not listed (their serials are in the audit log, kind admin_cert).
func (p *Provider) Admins(ctx context.Context) ([]Admin, error) {
	return listPublic(ctx, p, "admins", listAdmins)
}

// RevokeAdmin revokes administrator certificates: the one whose hex serial is ref, or
// else every live certificate of the admin named ref. From the next request on, on every
// replica, those certificates are refused (ErrAdminRevoked). Revoking would-be last
// live admin certificate is refused with ErrLastAdmin: issue another first. A serial that
// names no recorded certificate (one issued before nkp kept the record, as its admin_cert
// audit record shows) is recorded as revoked. It returns the certificates revoked now
// (none when they were revoked already).
func (p *Provider) RevokeAdmin(ctx context.Context, ref string) ([]Admin, error) {
	ref = strings.TrimSpace(ref)
	if ref == "" || len(ref) > 253 {
		return nil, fmt.Errorf("revoke admin %.40q: %w: give an admin name or a certificate serial (`nkpctl provider admins`)", ref, ErrBadRequest)
	}
	var revoked []Admin
	err := p.update(ctx, func(tx store.Tx, a *auditor) error {
		revoked = nil
		if _, err := readMeta(tx); err != nil {
			return err
		}
		all, err := listAdmins(tx)
		if err != nil {
			return err
		}
		now := a.now.UTC()
		var targets []adminRecord
		serial := strings.ToLower(ref)
		named := false
		for _, r := range all {
			if r.Serial == serial {
				targets = []adminRecord{r}
				break
			}
			if r.Name == ref {
				named = true
				if r.Revoked == nil {
					targets = append(targets, r)
				}
			}
		}
		if len(targets) == 0 && named {
			return nil // every certificate of that name is revoked already
		}
		if len(targets) == 0 {
			if !ca.IsSerial(serial) {
				return fmt.Errorf("admin %q: %w: no admin certificate has this name or serial; list them with `nkpctl provider admins`", ref, ErrNotFound)
			}
			targets = []adminRecord{{Name: "", Serial: serial}}
		}
		hit := map[string]bool{}
		for _, t := range targets {
			if t.Revoked == nil {
				hit[t.Serial] = true
			}
		}
		if len(hit) == 0 {
			return nil // revoked already
		}
		left := 0
		for _, r := range all {
			if r.active(now) && !hit[r.Serial] {
				left++
			}
		}
		if left == 0 {
			return fmt.Errorf("revoke admin %q: %w: it would leave no administrator certificate that can reach the provider; "+
				"issue another first (`nkpctl provider admins add NAME --out DIR`), then revoke this one with the new one", ref, ErrLastAdmin)
		}
		for _, t := range targets {
			if t.Revoked != nil {
				continue
			}
			t.Revoked = &now
			if err := putJSON(tx, bucketAdmins, t.Serial, t); err != nil {
				return err
			}
			if err := a.add(tx, audit.Event{Kind: audit.KindAdminRevoke, Actor: actorOf(ctx), Subject: t.Serial, Details: map[string]string{
				"name": t.Name, "cert_serial": t.Serial, "recorded": fmt.Sprint(!t.Issued.IsZero()),
			}}); err != nil {
				return err
			}
			revoked = append(revoked, t.public())
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("revoke admin: %w", err)
	}
	return revoked, nil
}

// AuthorizeAdmin checks an administrator's client certificate on every request: issued
// by this provider's CA for role nkp-admin and valid now (errors wrap ca.ErrNotIssued, and
// ca.ErrWrongRole for another role), and not revoked in the store: a revoked certificate
// is refused at once on every replica (ErrAdminRevoked). Certificates without a record
// (issued before nkp kept them) are allowed.
func (p *Provider) AuthorizeAdmin(ctx context.Context, cert *x509.Certificate) error {
	if cert == nil || cert.SerialNumber == nil {
		return fmt.Errorf("authorize admin: no client certificate: %w", ca.ErrNotIssued)
	}
	serial := cert.SerialNumber.Text(16)
	var m metaRecord
	var rec adminRecord
	found := false
	err := p.st.View(ctx, func(tx store.Tx) error {
		if err := store.Prefetch(tx, store.Key(bucketProvider, keyMeta), store.Key(bucketAdmins, serial)); err != nil {
			return err
		}
		var err error
		if m, err = readMeta(tx); err != nil {
			return err
		}
		err = getJSON(tx, bucketAdmins, serial, &rec)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		found = err == nil
		return err
	})
	if err != nil {
		return fmt.Errorf("authorize admin %q: %w", cert.Subject.CommonName, err)
	}
	authority, err := p.loadCA(ctx, m.ID)
	if err != nil {
		return fmt.Errorf("authorize admin %q: %w", cert.Subject.CommonName, err)
	}
	if _, err := p.verifyCert(authority, m.ID, cert, ca.RoleAdmin); err != nil {
		return fmt.Errorf("authorize admin: %w", err)
	}
	if found && rec.Revoked != nil {
		return fmt.Errorf("admin certificate %q (serial %s) %w at %s; use another administrator's credentials, or have one issue you a new certificate (`nkpctl provider admins add`)",
			cert.Subject.CommonName, serial, ErrAdminRevoked, rec.Revoked.Format(time.RFC3339))
	}
	return nil
}
