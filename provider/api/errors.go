package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// codedError is an error that already knows its HTTP status and code.
type codedError struct {
	status int
	code   string
	msg    string // the sentence sent to the client
	cause  error  // logged, not sent; may be nil
}

func (e *codedError) Error() string { return e.msg }

func (e *codedError) Unwrap() error { return e.cause }

// errorMap translates the domain's sentinel errors, in order; the first match wins. This
// is the only place where domain errors become HTTP statuses.
var errorMap = []struct {
	err    error
	status int
	code   string
}{
	{apiv1.ErrBadRequest, http.StatusBadRequest, apiv1.CodeBadRequest},
	// Certificate refusals first: the domain wraps them in ErrHostUnknown too.
	{ca.ErrWrongRole, http.StatusForbidden, apiv1.CodeForbidden},
	{ca.ErrNotIssued, http.StatusUnauthorized, apiv1.CodeUnauthenticated},
	{provider.ErrNotInitialized, http.StatusServiceUnavailable, apiv1.CodeNotInitialized},
	{provider.ErrNotBackedUp, http.StatusConflict, apiv1.CodeNotBackedUp},
	{provider.ErrTokenExpired, http.StatusForbidden, apiv1.CodeTokenExpired},
	{provider.ErrTokenUsed, http.StatusForbidden, apiv1.CodeTokenUsed},
	{provider.ErrTokenInvalid, http.StatusForbidden, apiv1.CodeTokenInvalid},
	{provider.ErrHostRevoked, http.StatusForbidden, apiv1.CodeHostRevoked},
	{provider.ErrHostUnknown, http.StatusForbidden, apiv1.CodeHostUnknown},
	{provider.ErrAdminRevoked, http.StatusForbidden, apiv1.CodeAdminRevoked},
	{provider.ErrLastAdmin, http.StatusConflict, apiv1.CodeLastAdmin},
	{provider.ErrTPMRequired, http.StatusForbidden, apiv1.CodeTPMRequired},
	{provider.ErrNotOwner, http.StatusForbidden, apiv1.CodeNotOwner},
	{provider.ErrInUse, http.StatusConflict, apiv1.CodeInUse},
	{provider.ErrNotEmpty, http.StatusConflict, apiv1.CodeNotEmpty},
	{provider.ErrBadPassphrase, http.StatusBadRequest, apiv1.CodeBadPassphrase},
	{provider.ErrBadArchive, http.StatusBadRequest, apiv1.CodeBadArchive},
	{provider.ErrNotFound, http.StatusNotFound, apiv1.CodeNotFound},
	{provider.ErrRootKeyMismatch, http.StatusServiceUnavailable, apiv1.CodeRootKeyMismatch},
	{provider.ErrBadRequest, http.StatusBadRequest, apiv1.CodeBadRequest},
	{audit.ErrTampered, http.StatusConflict, apiv1.CodeAuditBroken},
	{ca.ErrBadCSR, http.StatusBadRequest, apiv1.CodeBadRequest},
	{store.ErrNotFound, http.StatusNotFound, apiv1.CodeNotFound},
	{store.ErrConflict, http.StatusConflict, apiv1.CodeConflict},
	{store.ErrReadOnly, http.StatusServiceUnavailable, apiv1.CodeUnavailable},
	{store.ErrFull, http.StatusInsufficientStorage, apiv1.CodeUnavailable},
	{store.ErrClosed, http.StatusServiceUnavailable, apiv1.CodeUnavailable},
	{context.DeadlineExceeded, http.StatusServiceUnavailable, apiv1.CodeUnavailable},
	{context.Canceled, http.StatusServiceUnavailable, apiv1.CodeUnavailable},
}

// classify returns the status, code and sentence for err. Unknown errors become a 500
// whose sentence points at the provider log (the detail is logged, not sent).
func classify(err error) (int, string, string) {
	var ce *codedError
	if errors.As(err, &ce) {
		return ce.status, ce.code, ce.msg
	}
	for _, m := range errorMap {
		if errors.Is(err, m.err) {
			return m.status, m.code, err.Error()
		}
	}
	return http.StatusInternalServerError, apiv1.CodeInternal, "internal error in the provider; see its log for the cause"
}

// writeError sends the JSON error body and logs the refusal. Domain error texts never
// hold key material (the provider package's rule), so they may be logged and returned.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	status, code, msg := classify(err)
	s.m.refusals.WithLabelValues(code).Inc()
	level := s.log.Info
	if status >= 500 {
		level = s.log.Error
	}
	args := []any{"method", r.Method, "path", r.URL.Path, "status", status, "code", code, "err", err.Error()}
	if ce := (*codedError)(nil); errors.As(err, &ce) && ce.cause != nil {
		args = append(args, "cause", ce.cause.Error())
	}
	level("api: request refused", args...)
	s.writeJSON(w, status, apiv1.ErrorBody{Error: msg, Code: code})
}

// errBadRequestf is a 400 with a sentence.
func errBadRequestf(format string, args ...any) error {
	return &codedError{status: http.StatusBadRequest, code: apiv1.CodeBadRequest, msg: fmt.Sprintf(format, args...)}
}
