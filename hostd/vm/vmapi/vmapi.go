// Package vmapi is the wire contract of hostd's VM operations on its local API socket
// (/run/nkp/hostd.sock): paths, JSON types, error codes, and a small client over the unix
// socket. It is stdlib only, so that nkpctl links no hostd code. The server side is
// hostd/vm's Handler.
//
//	GET  /v1/vms                     → List (protected domains)
//	GET  /v1/vms/{domain}            → VM
//	POST /v1/vms/{domain}/protect    → VM
//	POST /v1/vms/{domain}/rekey      → VM
//	POST /v1/vms/{domain}/unprotect  UnprotectRequest → VM
//
// {domain} is a domain name or UUID. Every error is an Error body with a sentence that
// names the VM and says what to do, and a stable Code.
//
// Importers: hostd/vm, cmd/nkpctl (through its vm subcommands), tests.
package vmapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Paths of the VM operations.
const (
	PathVMs = "/v1/vms"
)

// DefaultSocket is hostd's local API socket.
const DefaultSocket = "/run/nkp/hostd.sock"

// Error codes.
const (
	CodeNotFound         = "not_found"         // no such domain
	CodeRunning          = "running"           // the operation needs a shut-off domain
	CodeAlreadyProtected = "already_protected" // protect of a protected domain
	CodeNotProtected     = "not_protected"     // rekey/unprotect of an unprotected domain
	CodeUnsupported      = "unsupported"       // a TPM nkp does not adopt (passthrough, foreign external, several)
	CodeUnavailable      = "unavailable"       // KDK, provider catalog or libvirt unreachable: retry later
	CodePending          = "pending"           // an interrupted operation on this VM could not be finished yet
	CodeBadRequest       = "bad_request"
	CodeInternal         = "internal"
)

// Error is every error response.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Object is one protected object of a VM.
type Object struct {
	Name       string `json:"name"`
	KeyID      string `json:"key_id"`
	KDKID      string `json:"kdk_id"`
	KDKVersion int    `json:"kdk_version"`
	// Primary says whether the object's KDK version is the current primary one (false:
	// `nkpctl vm rekey` moves it).
	Primary bool `json:"primary"`
}

// VM is a domain as hostd sees it.
type VM struct {
	Domain     string   `json:"domain"`
	UUID       string   `json:"uuid"`
	Protected  bool     `json:"protected"`
	ProviderID string   `json:"provider_id,omitempty"`
	Objects    []Object `json:"objects,omitempty"`
	Running    bool     `json:"running"`
	// TPM is the vTPM's health: "ok" (running, present and answering), "stopped", or a
	// sentence saying what is wrong.
	TPM string `json:"tpm,omitempty"`
	// Problems lists what needs an operator (metadata of another provider, an unfinished
	// operation, a TPM that does not answer), each a sentence.
	Problems []string `json:"problems,omitempty"`
	// Note says what the operation did ("adopted libvirt's swtpm state from DIR", "already
	// on the primary KDK version").
	Note string `json:"note,omitempty"`
}

// List is GET /v1/vms.
type List struct {
	VMs []VM `json:"vms"`
}

// UnprotectRequest is the body of POST /v1/vms/{domain}/unprotect.
type UnprotectRequest struct {
	// TPM is "keep" (a libvirt-managed swtpm with the vTPM's state, the default) or
	// "none" (the vTPM and its state are removed).
	TPM string `json:"tpm"`
}

// Unprotect TPM choices.
const (
	UnprotectKeep = "keep"
	UnprotectNone = "none"
)

// APIError is an error response received by Client.
type APIError struct {
	Status int
	Body   Error
}

func (e *APIError) Error() string { return e.Body.Error }

// IsCode says whether err is an APIError with that code.
func IsCode(err error, code string) bool {
	var a *APIError
	return errors.As(err, &a) && a.Body.Code == code
}

// Client talks to hostd's local API over its unix socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{socket: path, hc: &http.Client{Transport: tr, Timeout: 5 * time.Minute}}
}

// Get returns one VM's status.
func (c *Client) Get(ctx context.Context, domain string) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodGet, PathVMs+"/"+url.PathEscape(domain), nil, &v)
	return v, err
}

// List returns the protected VMs.
func (c *Client) List(ctx context.Context) (List, error) {
	var l List
	err := c.do(ctx, http.MethodGet, PathVMs, nil, &l)
	return l, err
}

// Protect protects a shut-off domain.
func (c *Client) Protect(ctx context.Context, domain string) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodPost, PathVMs+"/"+url.PathEscape(domain)+"/protect", nil, &v)
	return v, err
}

// Rekey moves a shut-off domain's vTPM to the primary KDK version.
func (c *Client) Rekey(ctx context.Context, domain string) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodPost, PathVMs+"/"+url.PathEscape(domain)+"/rekey", nil, &v)
	return v, err
}

// Unprotect gives a shut-off domain back to libvirt.
func (c *Client) Unprotect(ctx context.Context, domain string, req UnprotectRequest) (VM, error) {
	var v VM
	err := c.do(ctx, http.MethodPost, PathVMs+"/"+url.PathEscape(domain)+"/unprotect", req, &v)
	return v, err
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://hostd"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("hostd at %s: %w (is nkp-hostd running? the socket is set with --socket or NKP_HOSTD_SOCKET)", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("hostd at %s: reading the answer: %w", c.socket, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(data, &e.Body) != nil || e.Body.Error == "" {
			e.Body = Error{Error: fmt.Sprintf("hostd answered %s", resp.Status), Code: CodeInternal}
		}
		return e
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("hostd at %s: malformed answer: %w", c.socket, err)
	}
	return nil
}
