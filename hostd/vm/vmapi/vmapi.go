// Package vmapi is the wire contract of hostd's VM operations on its local API socket
// (/run/nkp/hostd.sock): paths, JSON types, error codes, and a small client over the unix
// socket. It is stdlib only, so that nkpctl links no hostd code. The server side is
// hostd/vm's Handler.
//
//	GET  /v1/vms                     → List (protected domains)
//	GET  /v1/vms/{domain}            → VM
//	POST /v1/vms/{domain}/protect    ProtectRequest → VM
//	POST /v1/vms/{domain}/finalize   → VM (kept original disk files removed)
//	POST /v1/vms/{domain}/rekey      RekeyRequest → VM
//	POST /v1/vms/{domain}/unprotect  UnprotectRequest → VM
//	POST /v1/vms/{domain}/forget     ForgetRequest → Forgotten (a VM libvirt no longer defines:
//	                                 its catalog objects, vTPM state, kept disk files and journal go;
//	                                 with local_only the catalog is not asked and keeps its objects)
//
// {domain} is a domain name or UUID. Every error is an Error body with a sentence that
// names the VM and says what to do, and a stable Code. The bodies are optional (empty:
// the defaults).
//
// Progress: a POST whose Accept header is ContentTypeNDJSON gets, with status 200, one
// JSON object per line: Event{Progress} while disks are converted and verified, then one
// Event with VM (success) or Error (failure, with its Code). Without it the answer is the
// single VM or Error body.
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
	"strings"
	"syscall"
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
	CodeRunning          = "running"           // the operation needs a shut-off domain (not running, no managed save image)
	CodeAlreadyProtected = "already_protected" // protect of a protected domain
	CodeNotProtected     = "not_protected"     // rekey/unprotect of an unprotected domain
	CodeUnsupported      = "unsupported"       // a TPM nkp does not adopt (passthrough, foreign external, several)
	CodeUnavailable      = "unavailable"       // KDK, provider catalog or libvirt unreachable: retry later
	CodePending          = "pending"           // an interrupted operation on this VM could not be finished yet
	CodeNoSpace          = "no_space"          // a disk conversion does not fit: the sentence says how much where
	CodeDefined          = "defined"           // forget of a domain libvirt still defines
	CodeConfirm          = "confirm"           // forget without ForgetRequest.Confirm: nothing was changed
	CodeRevoked          = "revoked"           // forget: the provider no longer accepts this host; nothing was changed (see ForgetRequest.LocalOnly)
	CodeBadRequest       = "bad_request"
	CodeInternal         = "internal"
	// CodeNoHostd is nkpctl's own, never hostd's: hostd could not be reached (not
	// running, or its socket is root's only).
	CodeNoHostd = "no_hostd"
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

// Disk is one disk of a VM as status shows it.
type Disk struct {
	Target string `json:"target"`
	// File is the disk's source file ("" for disks that are not files).
	File string `json:"file,omitempty"`
	// Format is the domain's <driver type> ("raw", "qcow2").
	Format string `json:"format,omitempty"`
	// Protected says the disk is nkp's: an object "disk:<target>" in the metadata.
	Protected bool `json:"protected"`
	// KeyID, KDKVersion, Primary: the disk object's key (when Protected).
	KeyID      string `json:"key_id,omitempty"`
	KDKVersion int    `json:"kdk_version,omitempty"`
	Primary    bool   `json:"primary,omitempty"`
	// LUKS is the image's LUKS header as qemu-img shows it (shut-off VMs; nil when not
	// read).
	LUKS *LUKS `json:"luks,omitempty"`
	// Originals are files this disk was converted from that are kept until
	// `nkpctl vm protect --finalize`.
	Originals []string `json:"originals,omitempty"`
	// OpenedEncrypted, for a running VM, is whether QEMU opened the disk encrypted (QMP
	// query-block through libvirt); nil when not asked.
	OpenedEncrypted *bool `json:"opened_encrypted,omitempty"`
	// Note says why an unprotected disk is skipped (cdrom, read-only, block device, …).
	Note string `json:"note,omitempty"`
}

// LUKS is a disk image's LUKS header.
type LUKS struct {
	Cipher      string `json:"cipher"` // e.g. "aes-256-xts"
	IVGen       string `json:"ivgen"`
	Hash        string `json:"hash"`
	Iters       int64  `json:"iters"` // PBKDF iterations of the first active keyslot
	ActiveSlots int    `json:"active_slots"`
}

// VM is a domain as hostd sees it.
type VM struct {
	Domain     string   `json:"domain"`
	UUID       string   `json:"uuid"`
	Protected  bool     `json:"protected"`
	ProviderID string   `json:"provider_id,omitempty"`
	Objects    []Object `json:"objects,omitempty"`
	// Disks are the domain's disks (protected or not).
	Disks   []Disk `json:"disks,omitempty"`
	Running bool   `json:"running"`
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

// Disk selections of ProtectRequest.Disks.
const (
	DisksAll  = "all"
	DisksNone = "none"
)

// ProtectRequest is the body of POST /v1/vms/{domain}/protect.
type ProtectRequest struct {
	// Disks is "all" (the default: every file disk that is not a cdrom, floppy,
	// read-only or shareable), "none", or target devs separated by commas ("vda,vdb").
	Disks string `json:"disks,omitempty"`
	// RemoveOriginal removes each original disk file once the domain uses its encrypted
	// copy (default: kept until finalize).
	RemoveOriginal bool `json:"remove_original,omitempty"`
	// AllowDoubleEncryption encrypts disks whose file sits on dm-crypt.
	AllowDoubleEncryption bool `json:"allow_double_encryption,omitempty"`
}

// RekeyRequest is the body of POST /v1/vms/{domain}/rekey.
type RekeyRequest struct {
	// Deep re-encrypts every disk's data under a new master key (a new file; the old
	// kept until finalize) instead of adding a keyslot.
	Deep bool `json:"deep,omitempty"`
}

// ContentTypeNDJSON asks for (and marks) a streamed answer with progress.
const ContentTypeNDJSON = "application/x-ndjson"

// Progress is how far one disk's conversion is.
type Progress struct {
	Disk  string `json:"disk"`  // target dev ("" for PhaseWait)
	Phase string `json:"phase"` // "convert", "verify", "done", or PhaseWait
	// Note, with PhaseWait, names the operation this one waits for ("protect of vm1").
	Note string `json:"note,omitempty"`
	// Done is the fraction of the phase done, 0 to 1.
	Done float64 `json:"done"`
	// Size is the disk's virtual size in bytes.
	Size int64 `json:"size,omitempty"`
}

// PhaseWait is the phase of a Progress sent before the operation starts when another
// operation on this host holds hostd's VM operations lock (they run one at a time).
const PhaseWait = "wait"

// Event is one line of a streamed answer: exactly one field is set.
type Event struct {
	Progress *Progress `json:"progress,omitempty"`
	VM       *VM       `json:"vm,omitempty"`
	Error    *Error    `json:"error,omitempty"`
}

// UnprotectRequest is the body of POST /v1/vms/{domain}/unprotect.
type UnprotectRequest struct {
	// TPM is "keep" (a libvirt-managed swtpm with the vTPM's state, the default) or
	// "none" (the vTPM and its state are removed).
	TPM string `json:"tpm"`
}

// ForgetRequest is the body of POST /v1/vms/{domain}/forget.
type ForgetRequest struct {
	// Confirm must be true: forget destroys the VM's vTPM state (its TPM's secrets)
	// irreversibly.
	Confirm bool `json:"confirm"`
	// LocalOnly: the provider is not asked (a host it revoked, or one that cannot reach
	// it): only this host's side goes (disks' secrets, kept files, vTPM state, journal),
	// and the VM's objects stay in the catalog for an administrator to remove
	// (Forgotten.LeftInCatalog and Note say which and how).
	LocalOnly bool `json:"local_only,omitempty"`
}

// CatalogObject is an object in the provider's catalog as forget reports it.
type CatalogObject struct {
	Name       string `json:"name"`
	KeyID      string `json:"key_id"`
	KDKVersion int    `json:"kdk_version"`
	// HostID is the host that owns it (set for objects another host owns).
	HostID string `json:"host_id,omitempty"`
}

// Forgotten is what forget did for a VM libvirt no longer defines.
type Forgotten struct {
	UUID string `json:"uuid"`
	// Domain is the name the VM had, when nkp knows it.
	Domain string `json:"domain,omitempty"`
	// Unregistered are the catalog objects removed (this host's).
	Unregistered []CatalogObject `json:"unregistered"`
	// OtherHosts are the VM's catalog objects another host owns: left alone (the VM
	// moved there, or was protected there).
	OtherHosts []CatalogObject `json:"other_hosts,omitempty"`
	// StateRemoved is the vTPM state directory removed ("" if there was none).
	StateRemoved string `json:"state_removed,omitempty"`
	// FilesRemoved are the kept original disk files removed.
	FilesRemoved []string `json:"files_removed,omitempty"`
	// LocalOnly: the provider was not asked (ForgetRequest.LocalOnly), and LeftInCatalog
	// are the VM's objects the catalog still holds as far as this host knows them (a
	// vTPM's KDK version is unknown, 0, when only its state directory named it).
	LocalOnly     bool            `json:"local_only,omitempty"`
	LeftInCatalog []CatalogObject `json:"left_in_catalog,omitempty"`
	// Problems are what forget left and why (a kept file another domain names, …).
	Problems []string `json:"problems,omitempty"`
	Note     string   `json:"note,omitempty"`
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

// Protect protects a shut-off domain with the defaults (every disk, originals kept).
func (c *Client) Protect(ctx context.Context, domain string) (VM, error) {
	return c.ProtectWith(ctx, domain, ProtectRequest{}, nil)
}

// ProtectWith protects a shut-off domain as req says; progress, if set, receives each
// disk's progress as hostd streams it.
func (c *Client) ProtectWith(ctx context.Context, domain string, req ProtectRequest, progress func(Progress)) (VM, error) {
	return c.op(ctx, domain, "protect", req, progress)
}

// Finalize removes the original disk files that protect, rekey --deep and unprotect
// kept (idempotent).
func (c *Client) Finalize(ctx context.Context, domain string) (VM, error) {
	return c.op(ctx, domain, "finalize", nil, nil)
}

// Rekey moves a shut-off domain's vTPM and disks to the primary KDK version (shallow).
func (c *Client) Rekey(ctx context.Context, domain string) (VM, error) {
	return c.RekeyWith(ctx, domain, RekeyRequest{}, nil)
}

// RekeyWith rekeys as req says, with progress as ProtectWith.
func (c *Client) RekeyWith(ctx context.Context, domain string, req RekeyRequest, progress func(Progress)) (VM, error) {
	return c.op(ctx, domain, "rekey", req, progress)
}

// Unprotect gives a shut-off domain back to libvirt.
func (c *Client) Unprotect(ctx context.Context, domain string, req UnprotectRequest) (VM, error) {
	return c.UnprotectWith(ctx, domain, req, nil)
}

// UnprotectWith unprotects with progress as ProtectWith.
func (c *Client) UnprotectWith(ctx context.Context, domain string, req UnprotectRequest, progress func(Progress)) (VM, error) {
	return c.op(ctx, domain, "unprotect", req, progress)
}

// Forget removes what nkp keeps for a VM libvirt no longer defines (domain: its UUID or
// the name it had): its objects in the provider's catalog, its vTPM state, the original
// disk files kept for it and its journal. req.Confirm must be true.
func (c *Client) Forget(ctx context.Context, domain string, req ForgetRequest) (Forgotten, error) {
	var f Forgotten
	err := c.do(ctx, http.MethodPost, PathVMs+"/"+url.PathEscape(domain)+"/forget", req, &f)
	return f, err
}

func (c *Client) op(ctx context.Context, domain, op string, req any, progress func(Progress)) (VM, error) {
	var v VM
	path := PathVMs + "/" + url.PathEscape(domain) + "/" + op
	if progress == nil {
		// No client timeout: converting disks takes as long as it takes; ctx bounds it.
		nc := *c
		hc := *c.hc
		hc.Timeout = 0
		nc.hc = &hc
		err := nc.do(ctx, http.MethodPost, path, req, &v)
		return v, err
	}
	err := c.stream(ctx, path, req, progress, &v)
	return v, err
}

// stream POSTs in and reads an NDJSON answer.
func (c *Client) stream(ctx context.Context, path string, in any, progress func(Progress), out *VM) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://hostd"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", ContentTypeNDJSON)
	hc := *c.hc
	hc.Timeout = 0 // a conversion takes as long as it takes; ctx bounds it
	resp, err := hc.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 || !strings.HasPrefix(resp.Header.Get("Content-Type"), ContentTypeNDJSON) {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(data, &e.Body) != nil || e.Body.Error == "" {
			e.Body = Error{Error: fmt.Sprintf("hostd answered %s", resp.Status), Code: CodeInternal}
		}
		if resp.StatusCode/100 == 2 {
			if err := json.Unmarshal(data, out); err == nil {
				return nil
			}
		}
		return e
	}
	dec := json.NewDecoder(io.LimitReader(resp.Body, 1<<30))
	for {
		var ev Event
		if err := dec.Decode(&ev); err != nil {
			return fmt.Errorf("hostd at %s: the answer ended before the result: %w", c.socket, err)
		}
		switch {
		case ev.Progress != nil:
			progress(*ev.Progress)
		case ev.Error != nil:
			return &APIError{Status: resp.StatusCode, Body: *ev.Error}
		case ev.VM != nil:
			*out = *ev.VM
			return nil
		}
	}
}

// dialError words a failed request: a socket this user may not open (hostd's is root's
// only) is not a hostd that is down.
func (c *Client) dialError(err error) error {
	if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		return fmt.Errorf("hostd at %s: %w: nkp-hostd's socket is root's only: run nkpctl vm as root (sudo nkpctl vm …)", c.socket, err)
	}
	return fmt.Errorf("hostd at %s: %w (is nkp-hostd running? the socket is set with --socket or NKP_HOSTD_SOCKET)", c.socket, err)
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
		return c.dialError(err)
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
