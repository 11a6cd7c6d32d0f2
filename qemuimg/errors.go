package qemuimg

import (
	"errors"
	"fmt"
	"strings"
)

// Kinds of qemu-img failure, for errors.Is on an *Error.
var (
	ErrWrongKey = errors.New("the key opens no keyslot of the image")
	ErrNoSpace  = errors.New("no space left on the device")
	ErrNotFound = errors.New("no such file")
	ErrLocked   = errors.New("the image is in use by another process")
	ErrDiffer   = errors.New("the images differ")
	ErrCorrupt  = errors.New("the image is corrupt")
	// ErrNotEncrypted: a key was given for a qcow2 image that has no encryption.
	ErrNotEncrypted = errors.New("the image is not encrypted")
	ErrFailed       = errors.New("qemu-img failed")
)

// Error is a failed qemu-img call.
type Error struct {
	Op     string // qemu-img subcommand
	Image  string // the image the call was about
	Kind   error  // one of the Err* kinds above
	Code   int    // qemu-img's exit code
	Detail string // qemu-img's last line on stderr (or stdout), trimmed
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "qemu-img %s %s: %v", e.Op, e.Image, e.Kind)
	if hint := hints[e.Kind]; hint != "" {
		b.WriteString(": " + hint)
	}
	if e.Detail != "" {
		fmt.Fprintf(&b, " (qemu-img said: %s)", e.Detail)
	}
	return b.String()
}

// Unwrap lets errors.Is match the kind.
func (e *Error) Unwrap() error { return e.Kind }

var hints = map[error]string{
	ErrWrongKey:     "the key is not this image's (another KDK version or key ID?); check `nkpctl vm status` and the provider's catalog",
	ErrNoSpace:      "free space on the target filesystem, or convert to another one; nothing was changed on the source",
	ErrNotFound:     "check the path in the domain XML",
	ErrLocked:       "is the VM running? shut it off (virsh shutdown) and try again",
	ErrCorrupt:      "run `qemu-img check -r` on a copy, or restore the image from a backup",
	ErrNotEncrypted: "the file holds plaintext although the domain names a key for it: was it replaced? restore the encrypted image, or protect the disk again (nkpctl vm protect)",
}

// patterns maps qemu-img's messages (LC_ALL=C) to kinds; the first match wins.
var patterns = []struct {
	substr string
	kind   error
}{
	{"Invalid password, cannot unlock any keyslot", ErrWrongKey},
	{"No space left on device", ErrNoSpace},
	{"Failed to get ", ErrLocked}, // "Failed to get shared "write" lock"
	{"Is another process using the image", ErrLocked},
	{"No such file or directory", ErrNotFound},
	{"Content mismatch", ErrDiffer},
	{"Image corrupted", ErrCorrupt},
	{"No encryption in image header", ErrNotEncrypted},
	{"corruptions were found", ErrCorrupt},
}

func newError(op, image string, code int, stderr string, stdout []byte) *Error {
	text := stderr
	if strings.TrimSpace(text) == "" {
		text = string(stdout)
	}
	e := &Error{Op: op, Image: image, Code: code, Kind: ErrFailed, Detail: lastLine(text)}
	for _, p := range patterns {
		if strings.Contains(text, p.substr) {
			e.Kind = p.kind
			break
		}
	}
	return e
}

// lastLine returns the last non-empty line of s, at most 300 bytes, printable only.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	l := strings.TrimSpace(lines[len(lines)-1])
	l = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, l)
	if len(l) > 300 {
		l = l[:300] + "…"
	}
	return l
}
