package api

import (
	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/apiv1"
)

// The domain's types become wire types only here.

func kdkVersionToWire(v provider.KDKVersion) apiv1.KDKVersion {
	return apiv1.KDKVersion{ID: v.ID, Version: v.Version, Primary: v.Primary, Created: v.Created, Retired: !v.Retired.IsZero()}
}

func statusToWire(st provider.Status, caHash string) apiv1.Status {
	out := apiv1.Status{State: string(st.State), ProviderID: st.ProviderID, Hosts: st.Hosts,
		LastBackup: st.LastBackup, TPMRequired: st.Policy.TPMRequired, CAHash: caHash, PendingBackups: st.PendingBackups,
		KDKs: make([]apiv1.KDKVersion, 0, len(st.KDKs))}
	for _, v := range st.KDKs {
		out.KDKs = append(out.KDKs, kdkVersionToWire(v))
	}
	return out
}

func backupInfoToWire(i provider.BackupInfo) apiv1.BackupInfo {
	return apiv1.BackupInfo{ProviderID: i.ProviderID, Created: i.Created, KDKVersions: len(i.KDKs), Hosts: i.Hosts, Objects: i.Objects, SHA256: i.SHA256}
}

func hostToWire(h provider.Host) apiv1.Host {
	return apiv1.Host{ID: h.ID, Hostname: h.Hostname, TPM: len(h.EKPublic) > 0, Enrolled: h.Enrolled, Revoked: !h.Revoked.IsZero(),
		CertNotAfter: h.CertNotAfter}
}

func objectToWire(o provider.Object) apiv1.Object {
	return apiv1.Object{VMUUID: o.VMUUID, Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion,
		HostID: o.HostID, Registered: o.Registered}
}

func policyToWire(p provider.Policy) apiv1.Policy { return apiv1.Policy{TPMRequired: p.TPMRequired} }

func policyFromWire(p apiv1.Policy) provider.Policy {
	return provider.Policy{TPMRequired: p.TPMRequired}
}

func adminToWire(a provider.Admin) apiv1.Admin {
	return apiv1.Admin{Name: a.Name, Serial: a.Serial, Issued: a.Issued, NotAfter: a.NotAfter, Revoked: !a.Revoked.IsZero(), RevokedAt: a.Revoked}
}

func adminsToWire(as []provider.Admin) apiv1.AdminsResponse {
	out := apiv1.AdminsResponse{Admins: make([]apiv1.Admin, 0, len(as))}
	for _, a := range as {
		out.Admins = append(out.Admins, adminToWire(a))
	}
	return out
}
