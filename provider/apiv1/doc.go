// Package apiv1 is version 1 of nkp-provider's HTTPS wire contract: the JSON request and
// response types, the route paths, the error codes and the strict body decoder. It is the
// only thing the provider's server (package provider/api) and its clients share.
//
// It imports only the standard library, so that a client links none of the server: no
// domain, store, age, root key, TPM server code or Prometheus.
//
// Who may import it: provider/api (the server), provider/client and the CLIs built on it,
// hostd, and tests. It must never import another nkp package (deps_test.go enforces it).
//
// Routes:
//
//	POST /v1/enroll                      EnrollRequest → EnrollResponse
//	GET  /v1/host/kdks[?known=KEYSET]    → ReleaseResponse (every KDK version in use; with the
//	                                     current key set as known: Unchanged, no keys, not audited)
//	POST /v1/host/objects                Object → 204 (registers, or replaces the entry of the same VM and name)
//	DELETE /v1/host/objects/{vm}/{name}  → 204 (the object is gone: VM deleted, disk removed)
//	DELETE /v1/host/objects/{vm}         → ForgetResponse (every object of the VM that the caller owns is
//	                                     removed; other hosts' objects of the VM are listed and left)
//	POST /v1/host/moves                  MoveRequest → ObjectsResponse (a migrated VM's objects, now the
//	                                     caller's; a host changes only its own objects: 403 "not_owner")
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
//	POST /v1/admin/objects/forget        ForgetRequest → ObjectsResponse (the objects removed; only those of
//	                                     revoked or unknown hosts: a live host's give 409 "in_use", nothing removed)
//	GET  /v1/admin/audit[?n=N]           → AuditResponse (the last N records: default 100, 0 = up to 10,000)
//	POST /v1/admin/audit/verify          → 204, or 409 code "audit_broken"
//	POST /v1/admin/audit/prune           AuditPruneRequest → AuditPruneResponse (records dated before a time,
//	                                     never the newest confirmed backup's audit head or later: 409 not_backed_up)
//	GET  /v1/admin/policy, PUT /v1/admin/policy  Policy
//	GET  /v1/admin/admins                → AdminsResponse (administrator certificates, revoked ones included)
//	POST /v1/admin/admins                AdminCertRequest → AdminCertResponse (a new administrator certificate)
//	POST /v1/admin/admins/revoke         AdminRevokeRequest → AdminsResponse (the certificates revoked now)
//
// Bodies are JSON ([]byte fields in standard base64), at most MaxBodyBytes
// (MaxArchiveBodyBytes for archives), decoded by Decode with unknown fields, trailing data
// and missing required fields refused. Every error is an ErrorBody {"error": sentence,
// "code": one of the Code constants}.
package apiv1

// Route paths.
const (
	PathHealthz       = "/healthz"
	PathReadyz        = "/readyz"
	PathMetrics       = "/metrics"
	PathEnroll        = "/v1/enroll"
	PathHostKDKs      = "/v1/host/kdks"
	PathHostObjects   = "/v1/host/objects"
	PathHostRenew     = "/v1/host/renew"
	PathHostMoves     = "/v1/host/moves"
	PathStatus        = "/v1/admin/status"
	PathBackup        = "/v1/admin/backup"
	PathBackupVerify  = "/v1/admin/backup/verify"
	PathBackupConfirm = "/v1/admin/backup/confirm"
	PathTokens        = "/v1/admin/tokens"
	PathHosts         = "/v1/admin/hosts"
	PathRotate        = "/v1/admin/rotate"
	PathKDKs          = "/v1/admin/kdks"
	PathObjects       = "/v1/admin/objects"
	PathObjectsForget = "/v1/admin/objects/forget"
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
	CodeNotOwner        = "not_owner"
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
