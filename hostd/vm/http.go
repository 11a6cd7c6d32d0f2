package vm

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

// OperationTimeout bounds one protect, rekey or unprotect. Operations run to the end
// even when the client goes away (a half-done operation is safe, but a finished one is
// better).
// A conversion of large disks takes long: the bound is generous.
const OperationTimeout = 6 * time.Hour

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
	op := func(body any, f func(ctx context.Context, domain string, progress ProgressFunc) (vmapi.VM, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), OperationTimeout)
			defer cancel()
			if body != nil && r.ContentLength != 0 {
				dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 64<<10))
				dec.DisallowUnknownFields()
				if err := dec.Decode(body); err != nil {
					reply(w, nil, badRequest{err})
					return
				}
			}
			if !strings.Contains(r.Header.Get("Accept"), vmapi.ContentTypeNDJSON) {
				v, err := f(ctx, r.PathValue("domain"), nil)
				reply(w, v, err)
				return
			}
			// Streamed: progress lines as they come, then the result or the error.
			w.Header().Set("Content-Type", vmapi.ContentTypeNDJSON)
			w.WriteHeader(http.StatusOK)
			rc := http.NewResponseController(w)
			enc := json.NewEncoder(w)
			var mu sync.Mutex
			var last time.Time
			send := func(ev vmapi.Event) {
				mu.Lock()
				defer mu.Unlock()
				enc.Encode(ev) // a client gone away does not stop the operation
				rc.Flush()
			}
			v, err := f(ctx, r.PathValue("domain"), func(p vmapi.Progress) {
				// At most ten lines a second per operation, and every phase change.
				if p.Done > 0 && p.Done < 1 && time.Since(last) < 100*time.Millisecond {
					return
				}
				last = time.Now()
				send(vmapi.Event{Progress: &p})
			})
			if err != nil {
				_, code := classify(err)
				send(vmapi.Event{Error: &vmapi.Error{Error: err.Error(), Code: code}})
				return
			}
			send(vmapi.Event{VM: &v})
		}
	}
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/protect", func(w http.ResponseWriter, r *http.Request) {
		var req vmapi.ProtectRequest
		op(&req, func(ctx context.Context, d string, p ProgressFunc) (vmapi.VM, error) {
			return m.ProtectWith(ctx, d, req, p)
		})(w, r)
	})
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/finalize", op(nil, func(ctx context.Context, d string, _ ProgressFunc) (vmapi.VM, error) {
		return m.Finalize(ctx, d)
	}))
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/rekey", func(w http.ResponseWriter, r *http.Request) {
		var req vmapi.RekeyRequest
		op(&req, func(ctx context.Context, d string, p ProgressFunc) (vmapi.VM, error) {
			return m.RekeyWith(ctx, d, req, p)
		})(w, r)
	})
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/unprotect", func(w http.ResponseWriter, r *http.Request) {
		var req vmapi.UnprotectRequest
		op(&req, func(ctx context.Context, d string, p ProgressFunc) (vmapi.VM, error) {
			return m.UnprotectWith(ctx, d, req.TPM, p)
		})(w, r)
	})
	mux.HandleFunc("POST "+vmapi.PathVMs+"/{domain}/forget", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), OperationTimeout)
		defer cancel()
		var req vmapi.ForgetRequest
		if r.ContentLength != 0 {
			dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 64<<10))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&req); err != nil {
				reply(w, nil, badRequest{err})
				return
			}
		}
		f, err := m.ForgetWith(ctx, r.PathValue("domain"), req)
		reply(w, f, err)
	})
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
	case errors.Is(err, ErrDefined):
		return http.StatusConflict, vmapi.CodeDefined
	case errors.Is(err, ErrNotConfirmed):
		return http.StatusBadRequest, vmapi.CodeConfirm
	case errors.Is(err, ErrRevoked):
		return http.StatusForbidden, vmapi.CodeRevoked
	case errors.Is(err, ErrPending):
		return http.StatusServiceUnavailable, vmapi.CodePending
	case errors.Is(err, ErrNoSpace):
		return http.StatusInsufficientStorage, vmapi.CodeNoSpace
	case errors.Is(err, ErrRunning), errors.Is(err, ErrSaved):
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
