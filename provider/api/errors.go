package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/ca"
	"github.com/nkp-dev/nkp/provider/store"
)

// codedError is an error that already knows its HTTP status and code.
type codedError struct {
	status int
	code   string
	msg    string
}

func (e *codedError) Error() string { return e.msg }

// errorMap translates the domain's sentinel errors, in order; the first match wins. This
// is the only place where domain errors become HTTP statuses.
var errorMap = []struct {
	err    error
	status int
	code   string
}{
	{ErrBadRequest, http.StatusBadRequest, CodeBadRequest},
	{provider.ErrNotInitialized, http.StatusServiceUnavailable, CodeNotInitialized},
	{provider.ErrNotBackedUp, http.StatusConflict, CodeNotBackedUp},
	{provider.ErrTokenExpired, http.StatusForbidden, CodeTokenExpired},
	{provider.ErrTokenUsed, http.StatusForbidden, CodeTokenUsed},
	{provider.ErrTokenInvalid, http.StatusForbidden, CodeTokenInvalid},
	{provider.ErrHostRevoked, http.StatusForbidden, CodeHostRevoked},
	{provider.ErrHostUnknown, http.StatusForbidden, CodeHostUnknown},
	{provider.ErrAdminRevoked, http.StatusForbidden, CodeAdminRevoked},
	{provider.ErrLastAdmin, http.StatusConflict, CodeLastAdmin},
	{provider.ErrTPMRequired, http.StatusForbidden, CodeTPMRequired},
	{provider.ErrInUse, http.StatusConflict, CodeInUse},
	{provider.ErrNotEmpty, http.StatusConflict, CodeNotEmpty},
	{provider.ErrBadPassphrase, http.StatusBadRequest, CodeBadPassphrase},
	{provider.ErrBadArchive, http.StatusBadRequest, CodeBadArchive},
	{provider.ErrNotFound, http.StatusNotFound, CodeNotFound},
	{provider.ErrRootKeyMismatch, http.StatusServiceUnavailable, CodeRootKeyMismatch},
	{provider.ErrBadRequest, http.StatusBadRequest, CodeBadRequest},
	{audit.ErrTampered, http.StatusConflict, CodeAuditBroken},
	{ca.ErrBadCSR, http.StatusBadRequest, CodeBadRequest},
	{ca.ErrNotIssued, http.StatusUnauthorized, CodeUnauthenticated},
	{store.ErrNotFound, http.StatusNotFound, CodeNotFound},
	{store.ErrConflict, http.StatusConflict, CodeConflict},
	{store.ErrReadOnly, http.StatusServiceUnavailable, CodeUnavailable},
	{store.ErrFull, http.StatusInsufficientStorage, CodeUnavailable},
	{store.ErrClosed, http.StatusServiceUnavailable, CodeUnavailable},
	{context.DeadlineExceeded, http.StatusServiceUnavailable, CodeUnavailable},
	{context.Canceled, http.StatusServiceUnavailable, CodeUnavailable},
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
	return http.StatusInternalServerError, CodeInternal, "internal error in the provider; see its log for the cause"
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
	level("api: request refused", "method", r.Method, "path", r.URL.Path, "status", status, "code", code, "err", err.Error())
	s.writeJSON(w, status, ErrorBody{Error: msg, Code: code})
}

// errBadRequestf is a 400 with a sentence.
func errBadRequestf(format string, args ...any) error {
	return &codedError{status: http.StatusBadRequest, code: CodeBadRequest, msg: fmt.Sprintf(format, args...)}
}
