// Package hookproto is the wire protocol between nkp-hook (the libvirt qemu hook, package
// hooks) and nkp-hostd's hook server: one request (what libvirt passed the hook: domain,
// operation, sub-operation, extra argument, domain XML) and one reply (allow, or refuse
// with the sentence libvirt shows the virsh user) per connection, over a root-only unix
// socket.
//
// Two framings, told apart by a message's first byte; hostd reads both (ReadRequestAny)
// and answers in the request's (WriteReplyIn):
//
//   - version 2, binary (what this release's hook sends; simple enough for nkp-hook's
//     assembly entry to write and check without the Go runtime): Magic ("nkph"), the
//     byte 2, then for a request domain, operation, sub-operation, extra and the XML,
//     each a 4-byte little-endian length and its bytes; for a reply a byte allow (1) or
//     refuse (0) and the message as a 4-byte little-endian length and its bytes. An
//     allow without a message is thus exactly the 10 bytes of ReplyAllow.
//   - version 1, JSON (the last release's hook, kept for upgrades): a 4-byte big-endian
//     length and then that many bytes of JSON (an object, unknown fields refused), whose
//     version field must be Version.
//
// Requests are at most MaxRequest bytes, replies' messages at most MaxReply bytes; a
// peer of another version is refused with a sentence saying to install matching
// nkp-hook and nkp-hostd. The hook reads either framing back (ReadReplyAny); a refusal
// in version 1's framing to its version 2 request can only come from a hostd of the last
// release that could not read it, and the hook then asks once more in version 1's framing
// (hooks' askAgainV1), so VMs keep starting between an upgrade and hostd's restart.
//
// The package also holds what the hook decides without asking hostd: Protected (does the
// XML carry nkp's metadata namespace at all) and Required (does the operation refuse when
// hostd cannot be asked).
//
// Importers: hooks (the hook program), hostd's hook server, tests. Standard library only,
// no cgo: the hook starts fast.
package hookproto

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// Version is the protocol version carried in every message.
const Version = 1

// Namespace is nkp's XML namespace for the domain <metadata> element
// (<nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1">). A domain whose XML does not contain it
// is not nkp's: the hook lets it pass untouched without asking hostd.
const Namespace = "https://nkp.dev/ns/vm/1"

// Size limits of messages (the length prefix excluded).
const (
	MaxRequest = 8 << 20  // domain XML is a few KiB; libvirt allows far less than this
	MaxReply   = 64 << 10 // a sentence
	MaxName    = 1024     // domain, operation, sub-operation, extra
)

// libvirt's qemu hook operations (argv[2] of the hook), as documented at
// https://libvirt.org/hooks.html.
const (
	OpPrepare   = "prepare"
	OpStart     = "start"
	OpStarted   = "started"
	OpStopped   = "stopped"
	OpRelease   = "release"
	OpMigrate   = "migrate"
	OpRestore   = "restore"
	OpReconnect = "reconnect"
	OpAttach    = "attach"
)

// ErrProtocol is wrapped by every error about a malformed message.
var ErrProtocol = errors.New("hook protocol")

// Request is what libvirt gave the hook.
type Request struct {
	Version int    `json:"version"`
	Domain  string `json:"domain"` // argv[1]: the domain's name
	Op      string `json:"op"`     // argv[2]: prepare, start, ...
	SubOp   string `json:"sub_op"` // argv[3]: begin, end, -
	Extra   string `json:"extra"`  // argv[4]: "-" for qemu hooks
	XML     string `json:"xml"`    // stdin: the domain XML (for migrate/restore: the incoming XML)
}

// Reply is hostd's answer.
type Reply struct {
	Version int  `json:"version"`
	Allow   bool `json:"allow"`
	// Message is printed on the hook's stderr: when refusing, the sentence the virsh user
	// sees (it names the VM, the key ID and what to do); when allowing, an optional warning.
	Message string `json:"message,omitempty"`
}

// Protected reports whether xml mentions nkp's namespace. It is the hook's fast path: a
// plain byte search, no parsing. A false positive (the namespace string in a domain's
// description) only costs a round trip to hostd, which parses the XML properly.
func Protected(xml []byte) bool { return bytes.Contains(xml, []byte(Namespace)) }

// Required reports whether an operation on a protected domain must be refused when hostd
// cannot be asked: the ones that (re)start a VM — prepare, start, migrate (on the
// destination), restore — and any operation this version does not know (fail closed).
// Operations after which nothing can be refused or where refusing would harm a running VM
// are not required: libvirt ignores the exit status of stopped and release, and a failed
// reconnect or attach hook makes libvirtd kill the running domain; hostd reconciles those
// from libvirt's lifecycle events instead.
func Required(op string) bool {
	switch op {
	case OpStarted, OpStopped, OpRelease, OpReconnect, OpAttach:
		return false
	}
	return true
}

// Validate checks the fields of a request that the protocol itself constrains.
func (r *Request) Validate() error {
	if r.Version != Version {
		return fmt.Errorf("%w: request version %d, this side speaks %d: install nkp-hook and nkp-hostd from the same release", ErrProtocol, r.Version, Version)
	}
	for _, f := range []struct{ name, v string }{{"domain", r.Domain}, {"operation", r.Op}, {"sub-operation", r.SubOp}, {"extra", r.Extra}} {
		if err := checkName(f.name, f.v); err != nil {
			return err
		}
	}
	if r.Domain == "" || r.Op == "" {
		return fmt.Errorf("%w: request without domain or operation", ErrProtocol)
	}
	if !utf8.ValidString(r.XML) {
		return fmt.Errorf("%w: domain %q: XML is not valid UTF-8", ErrProtocol, r.Domain)
	}
	return nil
}

func checkName(what, v string) error {
	if len(v) > MaxName {
		return fmt.Errorf("%w: %s is %d bytes, at most %d", ErrProtocol, what, len(v), MaxName)
	}
	if !utf8.ValidString(v) || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("%w: %s %q has control characters or is not UTF-8", ErrProtocol, what, v)
	}
	return nil
}

// Validate checks a reply.
func (r *Reply) Validate() error {
	if r.Version != Version {
		return fmt.Errorf("%w: reply version %d, this side speaks %d: install nkp-hook and nkp-hostd from the same release", ErrProtocol, r.Version, Version)
	}
	if !utf8.ValidString(r.Message) {
		return fmt.Errorf("%w: reply message is not valid UTF-8", ErrProtocol)
	}
	if !r.Allow && strings.TrimSpace(r.Message) == "" {
		return fmt.Errorf("%w: refusal without a message", ErrProtocol)
	}
	return nil
}

// WriteRequest validates r and writes it as one frame.
func WriteRequest(w io.Writer, r Request) error {
	if err := r.Validate(); err != nil {
		return err
	}
	return writeFrame(w, r, MaxRequest)
}

// ReadRequest reads and validates one request frame.
func ReadRequest(rd io.Reader) (Request, error) {
	var r Request
	if err := readFrame(rd, &r, MaxRequest); err != nil {
		return Request{}, fmt.Errorf("hook request: %w", err)
	}
	if err := r.Validate(); err != nil {
		return Request{}, err
	}
	return r, nil
}

// WriteReply validates r and writes it as one frame.
func WriteReply(w io.Writer, r Reply) error {
	if err := r.Validate(); err != nil {
		return err
	}
	return writeFrame(w, r, MaxReply)
}

// ReadReply reads and validates one reply frame.
func ReadReply(rd io.Reader) (Reply, error) {
	var r Reply
	if err := readFrame(rd, &r, MaxReply); err != nil {
		return Reply{}, fmt.Errorf("hook reply: %w", err)
	}
	if err := r.Validate(); err != nil {
		return Reply{}, err
	}
	return r, nil
}

func writeFrame(w io.Writer, v any, limit int) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("%w: encoding: %v", ErrProtocol, err)
	}
	if len(body) > limit {
		return fmt.Errorf("%w: message of %d bytes exceeds %d", ErrProtocol, len(body), limit)
	}
	buf := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	_, err = w.Write(append(buf, body...))
	return err
}

func readFrame(rd io.Reader, v any, limit int) error {
	var hdr [4]byte
	if _, err := io.ReadFull(rd, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: connection closed before a message", ErrProtocol)
		}
		return fmt.Errorf("%w: reading length: %w", ErrProtocol, err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > uint32(limit) {
		return fmt.Errorf("%w: message of %d bytes exceeds %d", ErrProtocol, n, limit)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(rd, body); err != nil {
		return fmt.Errorf("%w: message truncated (%d bytes announced): %w", ErrProtocol, n, err)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	if dec.More() || dec.InputOffset() != int64(len(body)) && len(bytes.TrimSpace(body[dec.InputOffset():])) > 0 {
		return fmt.Errorf("%w: trailing data after the JSON object", ErrProtocol)
	}
	return nil
}
