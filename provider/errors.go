package provider

import (
	"errors"

	"github.com/nkp-dev/nkp/provider/backup"
)

// Errors returned by Provider methods, wrapped with context; check with errors.Is. The
// HTTP edge (provider/api) maps each to a status and a stable code.
var (
	// ErrNotInitialized: the store holds no provider; run init or restore a backup.
	ErrNotInitialized = errors.New("provider not initialized")
	// ErrNotBackedUp: a KDK version is in no backup yet, so no KDK is released.
	ErrNotBackedUp = errors.New("provider not backed up")
	// ErrTokenInvalid: the join token is malformed, unknown or its secret is wrong.
	ErrTokenInvalid = errors.New("join token invalid")
	// ErrTokenExpired: the join token is past its expiry.
	ErrTokenExpired = errors.New("join token expired")
	// ErrTokenUsed: the join token was used already (tokens are single use).
	ErrTokenUsed = errors.New("join token already used")
	// ErrHostRevoked: the host was revoked.
	ErrHostRevoked = errors.New("host revoked")
	// ErrHostUnknown: no enrolled host matches (unknown ID, a certificate from another CA
	// or an older certificate of a re-enrolled host).
	ErrHostUnknown = errors.New("host unknown")
	// ErrAdminRevoked: the administrator certificate was revoked (RevokeAdmin).
	ErrAdminRevoked = errors.New("revoked")
	// ErrLastAdmin: revoking would leave no live administrator certificate.
	ErrLastAdmin = errors.New("last administrator")
	// ErrTPMRequired: policy tpm-required refuses a host without a TPM endorsement key.
	ErrTPMRequired = errors.New("TPM required by policy")
	// ErrInUse: the KDK version is still used (by catalog objects, or it is primary).
	ErrInUse = errors.New("KDK version in use")
	// ErrNotEmpty: the store already holds a provider (init twice, restore without force).
	ErrNotEmpty = errors.New("provider not empty")
	// ErrNotOwner: a host tried to change a catalog object another host registered
	// (MoveVM takes a migrated VM's objects over explicitly).
	ErrNotOwner = errors.New("catalog object belongs to another host")
	// ErrNotFound: the named KDK version, object or host does not exist.
	ErrNotFound = errors.New("not found")
	// ErrBadRequest: an argument is malformed (CSR, EK, UUID, name, TTL, ...).
	ErrBadRequest = errors.New("bad request")
	// ErrRootKeyMismatch: the store belongs to a provider whose root key is not the one
	// loaded (a store file from another provider, or the wrong root key file).
	ErrRootKeyMismatch = errors.New("root key does not match the store")
	// ErrBadPassphrase: the backup passphrase does not open the archive.
	ErrBadPassphrase = backup.ErrBadPassphrase
	// ErrBadArchive: the backup archive is truncated, altered or not an nkp backup.
	ErrBadArchive = backup.ErrBadArchive
)
