package vm

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

// OperationTimeout bounds one protect, rekey or unprotect. Operations run to the end
// even when the client goes away (a half-done operation is safe, but a finished one is
// better).
const OperationTimeout = 5 * time.Minute

// Handler serves the VM operations (vmapi's paths) for hostd's local API: mount it at
// vmapi.PathVMs and vmapi.PathVMs+"/". Access control is the socket's (root only).
func (m *Manager) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+vmapi.PathVMs, func(w http.ResponseWriter, r *http.Request) {
		vms, err := m.List(r.Context())
		reply(w, vmapi.List{VMs: vms}, err)
	})
	mux.HandleFunc("GET "+vmapi.PathVMs+"/{domain}", func(w http.ResponseWriter, r *http.Request) {
		v, err := m.Status(r.Context(), r.PathValue("domain"))
		reply(w, v, err)
	})
	op := func(f func(ctx context.Context, domain string, r *http.Request) (vmapi.VM, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), OperationTimeout)
			defer cancel()
			v, err := f(ctx, r.PathValue("domain"), r)
			reply(w, v, err)
		}
	}
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/protect", op(func(ctx context.Context, d string, _ *http.Request) (vmapi.VM, error) {
		return m.Protect(ctx, d)
	}))
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/rekey", op(func(ctx context.Context, d string, _ *http.Request) (vmapi.VM, error) {
		return m.Rekey(ctx, d)
	}))
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/unprotect", op(func(ctx context.Context, d string, r *http.Request) (vmapi.VM, error) {
		var req vmapi.UnprotectRequest
		if r.ContentLength != 0 {
			dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 64<<10))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&req); err != nil {
				return vmapi.VM{}, badRequest{err}
			}
		}
		return m.Unprotect(ctx, d, req.TPM)
	}))
	return mux
}

type badRequest struct{ err error }

func (b badRequest) Error() string { return "malformed request body: " + b.err.Error() }

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		status, code := classify(err)
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(vmapi.Error{Error: err.Error(), Code: code})
		return
	}
	json.NewEncoder(w).Encode(v)
}

// classify translates an operation's error to an HTTP status and a vmapi code.
func classify(err error) (int, string) {
	var br badRequest
	switch {
	case errors.As(err, &br), errors.Is(err, ErrBadArgument):
		return http.StatusBadRequest, vmapi.CodeBadRequest
	case errors.Is(err, ErrNoDomain):
		return http.StatusNotFound, vmapi.CodeNotFound
	case errors.Is(err, ErrPending):
		return http.StatusServiceUnavailable, vmapi.CodePending
	case errors.Is(err, ErrRunning):
		return http.StatusConflict, vmapi.CodeRunning
	case errors.Is(err, ErrAlreadyProtected):
		return http.StatusConflict, vmapi.CodeAlreadyProtected
	case errors.Is(err, ErrNotProtected):
		return http.StatusConflict, vmapi.CodeNotProtected
	case errors.Is(err, ErrUnsupported), errors.Is(err, domxml.ErrInvalid):
		return http.StatusUnprocessableEntity, vmapi.CodeUnsupported
	case errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable, vmapi.CodeUnavailable
	}
	return http.StatusInternalServerError, vmapi.CodeInternal
}
