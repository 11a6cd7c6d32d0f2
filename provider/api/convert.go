package api

import "github.com/nkp-dev/nkp/provider"

// The domain's types become wire types only here.

func kdkVersionToWire(v provider.KDKVersion) KDKVersion {
	return KDKVersion{ID: v.ID, Version: v.Version, Primary: v.Primary, Created: v.Created, Retired: !v.Retired.IsZero()}
}

func statusToWire(st provider.Status, caHash string) Status {
	out := Status{State: string(st.State), ProviderID: st.ProviderID, Hosts: st.Hosts,
		LastBackup: st.LastBackup, TPMRequired: st.Policy.TPMRequired, CAHash: caHash, PendingBackups: st.PendingBackups,
		KDKs: make([]KDKVersion, 0, len(st.KDKs))}
	for _, v := range st.KDKs {
		out.KDKs = append(out.KDKs, kdkVersionToWire(v))
	}
	return out
}

func backupInfoToWire(i provider.BackupInfo) BackupInfo {
	return BackupInfo{ProviderID: i.ProviderID, Created: i.Created, KDKVersions: len(i.KDKs), Hosts: i.Hosts, Objects: i.Objects, SHA256: i.SHA256}
}

func hostToWire(h provider.Host) Host {
	return Host{ID: h.ID, Hostname: h.Hostname, TPM: len(h.EKPublic) > 0, Enrolled: h.Enrolled, Revoked: !h.Revoked.IsZero(),
		CertNotAfter: h.CertNotAfter}
}

func objectToWire(o provider.Object) Object {
	return Object{VMUUID: o.VMUUID, Name: o.Name, KeyID: o.KeyID, KDKID: o.KDKID, KDKVersion: o.KDKVersion,
		HostID: o.HostID, Registered: o.Registered}
}

func policyToWire(p provider.Policy) Policy { return Policy{TPMRequired: p.TPMRequired} }

func policyFromWire(p Policy) provider.Policy { return provider.Policy{TPMRequired: p.TPMRequired} }

func adminToWire(a provider.Admin) Admin {
	return Admin{Name: a.Name, Serial: a.Serial, Issued: a.Issued, NotAfter: a.NotAfter, Revoked: !a.Revoked.IsZero(), RevokedAt: a.Revoked}
}

func adminsToWire(as []provider.Admin) AdminsResponse {
	out := AdminsResponse{Admins: make([]Admin, 0, len(as))}
	for _, a := range as {
		out.Admins = append(out.Admins, adminToWire(a))
	}
	return out
}
