// Package api is nkp-provider's HTTPS interface: a stdlib net/http handler over the
// provider domain (package provider), the TLS configuration that goes with it, and the
// JSON types that travel on the wire (shared with package provider/client).
//
// Transport: TLS 1.3 only. The server presents a certificate issued by the provider's own
// CA, followed by the CA certificate, so a joining host can pin the CA by the hash of its
// SubjectPublicKeyInfo ("sha256:<hex>", Provider.CAHash).
//
// Authentication, per route group:
//
//	GET  /healthz, /readyz, /metrics          none
//	POST /v1/enroll                           the join token in the body (no client certificate)
//	/v1/host/...                              a client certificate chained to the provider CA,
//	                                          authorized by Provider.AuthorizeHost on every request
//	                                          (unknown and revoked hosts are refused at once); the
//	                                          key fetch calls Provider.ReleaseTo, which authorizes
//	                                          the same way and releases from the same store read
//	/v1/admin/...                             a client certificate chained to the provider CA that
//	                                          carries the admin role (OU=nkp-admin), as issued at
//	                                          init into the provider directory for nkpctl
//
// Routes:
//
//	POST /v1/enroll                      EnrollRequest → EnrollResponse
//	GET  /v1/host/kdks                   → ReleaseResponse (every KDK version in use)
//	POST /v1/host/objects                Object → 204 (registers, or replaces the entry of the same VM and name)
//	DELETE /v1/host/objects/{vm}/{name}  → 204 (the object is gone: VM deleted, disk removed)
//	POST /v1/host/renew                  HostRenewRequest → EnrollResponse (a new certificate, same host ID;
//	                                     the one presented is accepted until the new one is first used)
//	GET  /v1/admin/status                → Status
//	POST /v1/admin/backup                BackupRequest → the age archive (application/octet-stream)
//	POST /v1/admin/backup/verify         ArchiveRequest → BackupInfo
//	POST /v1/admin/backup/confirm        BackupConfirmRequest → BackupInfo (the backup counts from now on)
//	POST /v1/admin/tokens                TokenRequest → Token
//	GET  /v1/admin/hosts                 → HostsResponse
//	POST /v1/admin/hosts/{id}/revoke     → 204
//	POST /v1/admin/rotate                → KDKVersion
//	POST /v1/admin/kdks/{version}/retire → 204
//	GET  /v1/admin/objects[?vm=UUID][&kdk_version=N] → ObjectsResponse
//	GET  /v1/admin/audit[?n=N]           → AuditResponse (the last N records: default 100, 0 = up to 10,000)
//	POST /v1/admin/audit/verify          → 204, or 409 code "audit_broken"
//	POST /v1/admin/audit/prune           AuditPruneRequest → AuditPruneResponse (records dated before a time,
//	                                     never the newest confirmed backup's audit head or later: 409 not_backed_up)
//	GET  /v1/admin/policy, PUT /v1/admin/policy  Policy
//	GET  /v1/admin/admins                → AdminsResponse (administrator certificates, revoked ones included)
//	POST /v1/admin/admins                AdminCertRequest → AdminCertResponse (a new administrator certificate)
//	POST /v1/admin/admins/revoke         AdminRevokeRequest → AdminsResponse (the certificates revoked now)
//
// Every /v1/admin request also passes Provider.AuthorizeAdmin: a revoked administrator
// certificate is refused (403, code admin_revoked) at once, on every replica.
//
// Bodies are JSON ([]byte fields in standard base64), read through http.MaxBytesReader
// (MaxBodyBytes, MaxArchiveBodyBytes for archives) and decoded with unknown fields
// refused. Every error is an ErrorBody {"error": sentence, "code": stable code}; the
// domain's sentinel errors are translated to status and code in one place (errors.go).
// Passphrases travel only inside mTLS request bodies and are wiped after use; no key
// material is ever logged.
//
// Importers: cmd/nkp-provider (server), provider/client (wire types).
package api

// Route paths, shared with provider/client.
const (
	PathHealthz       = "/healthz"
	PathReadyz        = "/readyz"
	PathMetrics       = "/metrics"
	PathEnroll        = "/v1/enroll"
	PathHostKDKs      = "/v1/host/kdks"
	PathHostObjects   = "/v1/host/objects"
	PathHostRenew     = "/v1/host/renew"
	PathStatus        = "/v1/admin/status"
	PathBackup        = "/v1/admin/backup"
	PathBackupVerify  = "/v1/admin/backup/verify"
	PathBackupConfirm = "/v1/admin/backup/confirm"
	PathTokens        = "/v1/admin/tokens"
	PathHosts         = "/v1/admin/hosts"
	PathRotate        = "/v1/admin/rotate"
	PathKDKs          = "/v1/admin/kdks"
	PathObjects       = "/v1/admin/objects"
	PathAudit         = "/v1/admin/audit"
	PathAuditVerify   = "/v1/admin/audit/verify"
	PathAuditPrune    = "/v1/admin/audit/prune"
	PathPolicy        = "/v1/admin/policy"
	PathAdmins        = "/v1/admin/admins"
	PathAdminsRevoke  = "/v1/admin/admins/revoke"
	AdminOU           = "nkp-admin"
	ContentTypeJSON   = "application/json"
	ContentTypeBinary = "application/octet-stream"
)

// Error codes in ErrorBody.Code.
const (
	CodeBadRequest      = "bad_request"
	CodeTooLarge        = "too_large"
	CodeUnauthenticated = "unauthenticated"
	CodeForbidden       = "forbidden"
	CodeNotFound        = "not_found"
	CodeNotInitialized  = "not_initialized"
	CodeNotBackedUp     = "not_backed_up"
	CodeTokenInvalid    = "token_invalid"
	CodeTokenExpired    = "token_expired"
	CodeTokenUsed       = "token_used"
	CodeHostRevoked     = "host_revoked"
	CodeHostUnknown     = "host_unknown"
	CodeAdminRevoked    = "admin_revoked"
	CodeLastAdmin       = "last_admin"
	CodeTPMRequired     = "tpm_required"
	CodeInUse           = "in_use"
	CodeNotEmpty        = "not_empty"
	CodeBadPassphrase   = "bad_passphrase"
	CodeBadArchive      = "bad_archive"
	CodeAuditBroken     = "audit_broken"
	CodeRootKeyMismatch = "root_key_mismatch"
	CodeConflict        = "conflict"
	CodeUnavailable     = "unavailable"
	CodeInternal        = "internal"
)
