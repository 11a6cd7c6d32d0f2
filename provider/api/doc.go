// Package api is nkp-provider's HTTPS interface: a stdlib net/http handler over the
// provider domain (package provider), the TLS configuration that goes with it, and the
// translation of the domain's types and errors into the wire types of package
// provider/apiv1.
//
// Transport: TLS 1.3 only. The server presents a certificate issued by the provider's own
// CA, followed by the CA certificate, so a joining host can pin the CA by the hash of its
// SubjectPublicKeyInfo ("sha256:<hex>", Provider.CAHash).
//
// Probes: /healthz answers 200 while the process serves, 503 after the daemon reported a
// serving failure (Server.Fail); /readyz also answers 503 while the store does not
// answer and while draining (Server.SetDraining; Server.WaitIdle waits for the API
// requests in flight). Neither needs a certificate.
//
// Authentication, per route group (the domain verifies every client certificate's chain,
// validity and role, in one place with one cache; this package only maps its refusals to
// 401 and 403):
//
//	GET  /healthz, /readyz, /metrics          none
//	POST /v1/enroll                           the join token in the body (no client certificate)
//	/v1/host/...                              a client certificate chained to the provider CA,
//	                                          checked by Provider.AuthorizeHost on every request
//	                                          (unknown and revoked hosts are refused at once); the
//	                                          key fetch calls Provider.ReleaseTo (authorizes the
//	                                          same way, then an audited release), a poll with
//	                                          ?known=KEYSET Provider.CheckRelease (one read, no keys)
//	/v1/admin/...                             a client certificate chained to the provider CA that
//	                                          carries the admin role (OU=nkp-admin), as issued at
//	                                          init into the provider directory for nkpctl, checked
//	                                          by Provider.AuthorizeAdmin on every request
//
// Routes, bodies and error codes are the wire contract in package provider/apiv1.
//
// A revoked administrator certificate is refused (403, code admin_revoked) at once, on
// every replica. A failure to read the CA certificate answers 503 (code unavailable).
//
// Bodies are JSON ([]byte fields in standard base64), read through http.MaxBytesReader
// (MaxBodyBytes, MaxArchiveBodyBytes for archives) and decoded with unknown fields
// refused. Every error is an ErrorBody {"error": sentence, "code": stable code}; the
// domain's sentinel errors are translated to status and code in one place (errors.go).
// Passphrases travel only inside mTLS request bodies and are wiped after use; no key
// material is ever logged.
//
// Who may import it: the provider's daemon (provider/api/daemon, cmd/nkp-provider) and
// tests. Clients (provider/client, nkpctl, hostd) import provider/apiv1 instead and never
// this package, which links the domain, the stores and Prometheus.
package api
