package hookproto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Version2 is the binary framing (see the package doc), which nkp-hook's assembly entry
// writes and reads before the Go runtime starts. Request.Version and Reply.Version carry
// 2 for messages in it.
const Version2 = 2

// Magic begins every message in the binary framing. Its first byte is not 0, the first
// byte of every JSON frame (whose length is below 16 MiB), so a reader tells the two
// framings apart by it.
const Magic = "nkph"

// headerLen is Magic and the version byte.
const headerLen = len(Magic) + 1

// ReplyAllow is the whole of a binary reply that allows without a message: the one
// nkp-hook's assembly entry answers itself (exit 0) without starting the Go runtime.
const ReplyAllow = Magic + "\x02\x01\x00\x00\x00\x00"

// AppendRequest2 validates r (its Version is ignored) and appends it in the binary
// framing: Magic, the byte 2, then domain, operation, sub-operation, extra and the XML,
// each as a 4-byte little-endian length and its bytes.
func AppendRequest2(b []byte, r Request) ([]byte, error) {
	r.Version = Version
	if err := r.Validate(); err != nil {
		return b, err
	}
	if n := headerLen + 5*4 + len(r.Domain) + len(r.Op) + len(r.SubOp) + len(r.Extra) + len(r.XML); n > MaxRequest {
		return b, fmt.Errorf("%w: message of %d bytes exceeds %d", ErrProtocol, n, MaxRequest)
	}
	b = append(b, Magic...)
	b = append(b, Version2)
	for _, s := range []string{r.Domain, r.Op, r.SubOp, r.Extra, r.XML} {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	return b, nil
}

// WriteRequest2 writes r in the binary framing with one Write.
func WriteRequest2(w io.Writer, r Request) error {
	b, err := AppendRequest2(nil, r)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// AppendReply2 validates r (its Version is ignored) and appends it in the binary framing:
// Magic, the byte 2, allow (1) or refuse (0), the message as a 4-byte little-endian
// length and its bytes.
func AppendReply2(b []byte, r Reply) ([]byte, error) {
	r.Version = Version
	if err := r.Validate(); err != nil {
		return b, err
	}
	if len(r.Message) > MaxReply {
		return b, fmt.Errorf("%w: message of %d bytes exceeds %d", ErrProtocol, len(r.Message), MaxReply)
	}
	b = append(b, Magic...)
	allow := byte(0)
	if r.Allow {
		allow = 1
	}
	b = append(b, Version2, allow)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(r.Message)))
	return append(b, r.Message...), nil
}

// ReadRequestAny reads one request in either framing (told apart by its first byte) and
// returns it with its Version set to the framing's (1 or 2), which is also returned on
// error, so that the refusal goes back in the framing the peer reads (WriteReplyIn).
func ReadRequestAny(rd *bufio.Reader) (Request, int, error) {
	first, err := rd.Peek(1)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return Request{}, Version, fmt.Errorf("hook request: %w: connection closed before a message", ErrProtocol)
		}
		return Request{}, Version, fmt.Errorf("hook request: %w: reading: %w", ErrProtocol, err)
	}
	if first[0] != Magic[0] {
		r, err := ReadRequest(rd)
		return r, Version, err
	}
	r, err := readRequest2(rd)
	if err != nil {
		return Request{}, Version2, fmt.Errorf("hook request: %w", err)
	}
	return r, Version2, nil
}

// DecodeRequest2 decodes a whole binary request (trailing bytes refused).
func DecodeRequest2(b []byte) (Request, error) {
	rd := bytes.NewReader(b)
	r, err := readRequest2(rd)
	if err != nil {
		return Request{}, fmt.Errorf("hook request: %w", err)
	}
	if rd.Len() != 0 {
		return Request{}, fmt.Errorf("hook request: %w: %d bytes after the message", ErrProtocol, rd.Len())
	}
	return r, nil
}

func readRequest2(rd io.Reader) (Request, error) {
	if err := readHeader(rd); err != nil {
		return Request{}, err
	}
	var f [5]string
	total := headerLen
	for i, limit := range []int{MaxName, MaxName, MaxName, MaxName, MaxRequest} {
		s, err := readString(rd, limit, &total)
		if err != nil {
			return Request{}, fmt.Errorf("%s: %w", []string{"domain", "operation", "sub-operation", "extra", "XML"}[i], err)
		}
		f[i] = s
	}
	r := Request{Version: Version, Domain: f[0], Op: f[1], SubOp: f[2], Extra: f[3], XML: f[4]}
	if err := r.Validate(); err != nil {
		return Request{}, err
	}
	r.Version = Version2
	return r, nil
}

// ReadReplyAny reads one reply in either framing (a hook of this release talking to a
// hostd of the last one gets JSON back).
func ReadReplyAny(rd io.Reader) (Reply, error) {
	var first [1]byte
	if _, err := io.ReadFull(rd, first[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return Reply{}, fmt.Errorf("hook reply: %w: connection closed before a message", ErrProtocol)
		}
		return Reply{}, fmt.Errorf("hook reply: %w: reading: %w", ErrProtocol, err)
	}
	rd = io.MultiReader(bytes.NewReader(first[:]), rd)
	if first[0] != Magic[0] {
		return ReadReply(rd)
	}
	r, err := readReply2(rd)
	if err != nil {
		return Reply{}, fmt.Errorf("hook reply: %w", err)
	}
	return r, nil
}

// DecodeReply2 decodes a whole binary reply (trailing bytes refused).
func DecodeReply2(b []byte) (Reply, error) {
	rd := bytes.NewReader(b)
	r, err := readReply2(rd)
	if err != nil {
		return Reply{}, fmt.Errorf("hook reply: %w", err)
	}
	if rd.Len() != 0 {
		return Reply{}, fmt.Errorf("hook reply: %w: %d bytes after the message", ErrProtocol, rd.Len())
	}
	return r, nil
}

func readReply2(rd io.Reader) (Reply, error) {
	if err := readHeader(rd); err != nil {
		return Reply{}, err
	}
	var allow [1]byte
	if _, err := io.ReadFull(rd, allow[:]); err != nil {
		return Reply{}, truncated(err)
	}
	if allow[0] > 1 {
		return Reply{}, fmt.Errorf("%w: allow byte %d, want 0 or 1", ErrProtocol, allow[0])
	}
	total := headerLen + 1
	msg, err := readString(rd, MaxReply, &total)
	if err != nil {
		return Reply{}, fmt.Errorf("message: %w", err)
	}
	r := Reply{Version: Version, Allow: allow[0] == 1, Message: msg}
	if err := r.Validate(); err != nil {
		return Reply{}, err
	}
	r.Version = Version2
	return r, nil
}

// WriteReplyIn writes r in the framing of a request of version v (1 or 2).
func WriteReplyIn(w io.Writer, v int, r Reply) error {
	if v != Version2 {
		r.Version = Version
		return WriteReply(w, r)
	}
	b, err := AppendReply2(nil, r)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func readHeader(rd io.Reader) error {
	var h [headerLen]byte
	if _, err := io.ReadFull(rd, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: connection closed before a message", ErrProtocol)
		}
		return truncated(err)
	}
	if string(h[:len(Magic)]) != Magic {
		return fmt.Errorf("%w: message starts with %q, not %q", ErrProtocol, h[:len(Magic)], Magic)
	}
	if h[len(Magic)] != Version2 {
		return fmt.Errorf("%w: binary message version %d, this side speaks %d: install nkp-hook and nkp-hostd from the same release", ErrProtocol, h[len(Magic)], Version2)
	}
	return nil
}

// readString reads a 4-byte little-endian length and that many bytes, at most limit,
// and the whole message (*total) at most MaxRequest.
func readString(rd io.Reader, limit int, total *int) (string, error) {
	var n [4]byte
	if _, err := io.ReadFull(rd, n[:]); err != nil {
		return "", truncated(err)
	}
	l := binary.LittleEndian.Uint32(n[:])
	*total += 4
	if uint64(l) > uint64(limit) || uint64(*total)+uint64(l) > MaxRequest {
		return "", fmt.Errorf("%w: %d bytes exceed %d", ErrProtocol, l, limit)
	}
	*total += int(l)
	var sb strings.Builder
	if _, err := io.CopyN(&sb, rd, int64(l)); err != nil {
		return "", truncated(err)
	}
	return sb.String(), nil
}

func truncated(err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%w: message truncated: %w", ErrProtocol, err)
}
