package provider

import (
	"context"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// RenewHost issues an enrolled host a new certificate with the same host ID, for the key
// in csrDER (the host's current key or a new one). The caller authenticates with cert,
// its current certificate; a revoked or unknown host is refused (ErrHostRevoked,
// ErrHostUnknown).
//
// The certificate it renews stays accepted only until the new one is first presented
// (AuthorizeHost then retires it): the host proves it stored the new certificate before
// the old one stops working, so a lost response or a crash of the host mid-renewal never
// locks it out, and no more than one superseded certificate is ever accepted. Renewing
// again with that older certificate (a retry) issues another one and supersedes the
// unused one.
func (p *Provider) RenewHost(ctx context.Context, cert *x509.Certificate, csrDER []byte) (EnrollResponse, error) {
	h, err := p.AuthorizeHost(ctx, cert)
	if err != nil {
		return EnrollResponse{}, fmt.Errorf("renew: %w", err)
	}
	if _, err := ca.ParseCSR(csrDER); err != nil {
		return EnrollResponse{}, fmt.Errorf("renew host %s: %w: %w", h.ID, ErrBadRequest, err)
	}
	var providerID string
	if err := p.st.View(ctx, func(tx store.Tx) error {
		m, err := readMeta(tx)
		providerID = m.ID
		return err
	}); err != nil {
		return EnrollResponse{}, fmt.Errorf("renew host %s: %w", h.ID, err)
	}
	authority, err := p.loadCA(ctx, providerID)
	if err != nil {
		return EnrollResponse{}, fmt.Errorf("renew host %s: %w", h.ID, err)
	}
	issued, err := authority.IssueHost(csrDER, h.ID, p.now().UTC(), p.cfg.HostCertValidity)
	if err != nil {
		return EnrollResponse{}, fmt.Errorf("renew host %s: %w: %w", h.ID, ErrBadRequest, err)
	}
	serial := cert.SerialNumber.Text(16)
	err = p.update(ctx, func(tx store.Tx, a *auditor) error {
		m, err := readMeta(tx)
		if err != nil {
			return err
		}
		if m.ID != providerID {
			return fmt.Errorf("the store now holds provider %s (restored during the renewal); renew again", m.ID)
		}
		rec, err := readHost(tx, h.ID)
		if err != nil {
			return err
		}
		if rec.Revoked != nil {
			return fmt.Errorf("host %s (%s): %w at %s; enroll it again with a new token if it should come back",
				rec.ID, rec.Hostname, ErrHostRevoked, rec.Revoked.Format(time.RFC3339))
		}
		switch serial {
		case rec.CertSerial:
			rec.PrevCertSerial = rec.CertSerial
		case rec.PrevCertSerial:
			// A retry with the certificate renewed before: it stays the superseded one.
		default:
			return fmt.Errorf("host %s (%s): certificate serial %s is no longer accepted (current %s): %w",
				rec.ID, rec.Hostname, serial, rec.CertSerial, ErrHostUnknown)
		}
		old := rec.CertSerial
		rec.CertSerial, rec.CertNotAfter = issued.Serial, issued.Cert.NotAfter.UTC()
		if err := putJSON(tx, bucketHosts, rec.ID, rec); err != nil {
			return err
		}
		return a.add(tx, audit.Event{Kind: audit.KindHostRenew, Actor: "host:" + rec.ID, Subject: rec.ID, Details: map[string]string{
			"hostname": rec.Hostname, "cert_serial": issued.Serial, "replaces_serial": old, "presented_serial": serial,
			"not_after": issued.Cert.NotAfter.UTC().Format(time.RFC3339),
		}})
	})
	if err != nil {
		return EnrollResponse{}, fmt.Errorf("renew host %s: %w", h.ID, err)
	}
	return EnrollResponse{HostID: h.ID, Certificate: issued.DER, CAChain: [][]byte{authority.Certificate().Raw}}, nil
}

// retirePrevious forgets a host's superseded certificate once its current one was
// presented (see RenewHost). A failure only delays it to the next request.
func (p *Provider) retirePrevious(ctx context.Context, hostID, current string) {
	err := p.update(ctx, func(tx store.Tx, _ *auditor) error {
		rec, err := readHost(tx, hostID)
		if err != nil || rec.CertSerial != current || rec.PrevCertSerial == "" {
			return err
		}
		rec.PrevCertSerial = ""
		return putJSON(tx, bucketHosts, hostID, rec)
	})
	if err != nil {
		p.log.Warn("retiring a host's superseded certificate failed; retried on its next request", "host_id", hostID, "err", err)
	}
}
