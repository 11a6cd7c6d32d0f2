// Package provider is the key provider's domain logic, with no HTTP: it generates and
// versions Key Derivation Keys (KDKs), refuses to release them until a backup exists,
// enrolls hosts (single-use join token → certificate from its own CA), releases KDKs to
// enrolled hosts wrapped for their TPM (go-tpm-tools import blobs), keeps the catalog of
// protected objects, and records every action in the hash-chained audit log
// (provider/audit) inside the same store transaction as the action.
//
// Open a Provider over a store.Store (provider/store/mem, boltstore or etcdstore) and the
// provider root key (provider/rootkey). Several Providers may share one etcd store
// (replicas): every decision reads the store, so a revocation made on one replica refuses
// the host on the others at once. Each replica caches only the CA, keyed by provider ID,
// and reloads it when a forced Restore on another replica changed the provider.
//
// # State kept in the store
//
//	bucket "provider"  key "meta"  JSON meta: provider ID, created, policy, last backup,
//	                                a root key check value (sealed, AD "nkp/v1/root-check/<id>")
//	                   key "ca"    JSON: CA certificate DER, CA key PKCS#8 sealed (AD "nkp/v1/ca/<id>")
//	bucket "kdks"      key %010d version  JSON: id, version, created, primary, retired,
//	                                backed_up, key sealed under the root key (AD "nkp/v1/kdk/<provider id>/<kdk id>")
//	bucket "tokens"    key token ID  JSON: SHA-256 of the secret, created, expires, used
//	bucket "hosts"     key host ID   JSON: hostname, enrolled, certificate serial (and the one a renewal
//	                                superseded, until the new one is used), EK public (PKIX DER), revoked
//	bucket "objects"   key <vm uuid>/<name>  JSON Object
//	bucket "backups"   key hex SHA-256 of an archive  JSON: the backup written and the KDK
//	                                IDs it holds, confirmed time once confirmed (kept PendingBackupTTL)
//	bucket "admins"    key hex certificate serial  JSON: admin name, issued, not after, revoked
//	buckets "audit", "audit.head"  owned by provider/audit
//
// # Rules
//
//   - The provider state is NotBackedUp while any live KDK version is in no confirmed
//     backup (after Init, and again after Rotate until the next backup); every Release is
//     refused then. Backup writes the archive and records it as pending; only
//     ConfirmBackup with the archive's SHA-256 — sent once the archive is stored durably and
//     opened again with its passphrase — marks the versions it holds as backed up.
//   - A host enrolled with an endorsement key gets import blobs that only its TPM can
//     unwrap; a host without one gets bare KDKs (inside mTLS) only while policy
//     tpm-required is off, and cannot enroll while it is on.
//   - A KDK version is retired only when no catalog object uses it, and never while primary;
//     retiring destroys its sealed key (backups still hold it).
//   - A host changes only the catalog objects it registered (ErrNotOwner otherwise), so no
//     host can empty the catalog under another host's VMs and let a version they need be
//     retired. A migrated VM's new host takes the VM's objects over explicitly (MoveVM),
//     only for a VM the catalog holds; the audit log records the move and its old hosts.
//   - A VM deleted for good leaves the catalog by ForgetVM, from the host that owns its
//     objects (nkpctl vm forget): only that host's objects go, one transaction, each
//     audited as unregister; objects another host owns stay (the VM moved there). A host
//     that is gone cannot do it: ForgetObjects lets an administrator remove the objects
//     of a revoked or no longer enrolled host (audited as forget), never a live host's.
//   - Every release that hands out keys is checked against the store and has its own
//     audit record, committed before the keys leave (ReleaseTo). A host that asks whether
//     its keys changed (CheckRelease, with the key set of its last release) is checked the
//     same way in one read of the store — one linearizable request on etcd, so a
//     revocation, rotation or retirement committed on any replica is seen — and gets no
//     keys, so nothing is audited.
//   - Every admin request is checked against the "admins" bucket (AuthorizeAdmin): a
//     revoked administrator certificate is refused on every replica at once, and the last
//     live one cannot be revoked.
//   - No key bytes are logged or audited: audit details carry IDs and versions only.
//
// # Load model of the key-release path
//
// A host fetches its KDKs when it joins, when its hostd restarts, and when the key set
// changes (a KDK version is rotated in and backed up, or retired). Between those it polls
// (hostd's sync interval, 1 min by default) with CheckRelease, which reads and never
// writes. For 10,000 hosts that is:
//
//   - polls: 10,000/min ≈ 170/s, read-only (one store read each; on etcd one request);
//   - key fetches: one per host per event. A rotation, or every host restarting at once
//     after a power cut, is 10,000 audited fetches; spread over one poll interval that is
//     ≈ 170/s, and 500/s is the peak the benchmark holds (test/bench/providerbench).
//
// Each key fetch appends to the audit log, whose records form one hash chain, so fetches
// committed one by one would queue for the chain's head: on bbolt two fsyncs each, on etcd
// a raft round each and conflicts on the head. That is the one piece of machinery the
// numbers justify: concurrent fetches share a transaction (group commit, at most 32 per
// batch, each waiter honouring its request's context). Nothing else is kept per replica:
// no cache of earlier releases, no repeat counts.
//
// Only provider/api (the HTTPS edge), cmd/nkp-provider and tests import this package.
//
// More of the contract:
//   - TPM hosts get server.CreateImportBlob blobs (proto-marshalled pb.ImportBlob, no
//     PCR policy) for their EK, which must be one of the default EK templates
//     (RSA-2048 or ECC P-256, as client.EndorsementKeyRSA/ECC load); Enroll refuses
//     others. AuthorizeHost also requires the certificate to be the host's current
//     one (by serial).
//   - Restore writes everything in one store transaction: on etcd, run it with
//     --max-txn-ops 16384 (etcdstore's package doc) or an archive with more than
//     about 100 hosts and objects is refused. It keeps the audit log of a forced
//     restore and appends to it; tokens are not restored.
package provider
