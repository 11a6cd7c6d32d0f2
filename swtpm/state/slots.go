package state

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
)

// nkp's slotted state file (written whenever a key is set): two slots of S bytes each,
// the file exactly 2·S bytes. A Store after the first overwrites the slot that does not
// hold the newest record in place and makes it durable, instead of a new file, fsync,
// rename and fsync of the directory. The reader takes the newest slot that opens.
//
// Each slot (format version 3; version 2 is the same without the state ID, header 48
// bytes, and is still read):
//
//	offset size
//	0      32   the version 1 header (magic, version 3, blob type, flags, key id, nonce)
//	32     8    sequence number, big-endian: one more than the slot it replaces
//	40     4    slot size S, big-endian (must equal the file's size / 2)
//	44     4    payload length n, big-endian
//	48     16   state ID: the directory's (.nkp-state-id), so a file copied from another
//	            VM's directory under the same key is refused (ErrForeign)
//	64     16   header tag: HMAC-SHA256(header key, bytes 0..63), first 16 bytes
//	80     n+16 AES-256-GCM ciphertext and tag of the payload
//	...         unused up to S (zeros, or what an older record left)
//
// Bytes 0..63 are the AEAD's additional data, so the sequence number, sizes, blob type
// and state ID are authenticated along with the payload; the header tag authenticates
// them on their own, so that a slot whose body fails tells truthfully which record it
// held. Flags: bit 0 (flagNoSync) says the record was written without fsync
// (Options.NoSync); no other bit is defined.
//
// Version 3 records are written body first, fdatasync, then the header (one 80-byte
// write inside the slot's first sector), fdatasync. So a crash or power loss during a
// write leaves either the slot's old, authentic header over a partly new body (it names
// an older record than the other slot's: a torn write, tolerated, nothing acknowledged
// is lost) or the complete new record. A slot whose authentic header names a newer
// record than the intact slot but whose body fails authentication was complete when its
// write was acknowledged, so it was damaged afterwards (bit rot, tampering); so was a
// slot whose header itself fails. Loading the older slot then would silently undo an
// acknowledged write, so the file is refused (ErrRollback) unless
// Options.AcceptRollback. Version 2 records (and records written with flagNoSync) were
// written in one pass, so there the two cases cannot be told apart: the older slot is
// loaded, loudly (Dir logs each such slot at error level and counts it in Stats).
const (
	fileVersionSlots = 2 // slotted, without state ID (nkp-swtpm before the state ID); read only
	fileVersionBound = 3 // slotted, with state ID; written
	slotHeaderV2     = 48
	slotHeaderSize   = 80 // version 3
	slotAADSize      = 64 // version 3: bytes authenticated by the header tag and the AEAD
	headerTagSize    = 16
	stateIDSize      = 16
	slotAlign        = 4096

	flagNoSync uint16 = 1
)

// slotInfo locates the newest record of a slotted file: where the next in-place write
// goes, and with which sequence number.
type slotInfo struct {
	size int    // S
	seq  uint64 // sequence number of the newest record
	cur  int    // slot (0 or 1) that holds it
}

// slotDamage describes a slot that failed to open and was passed over for the other.
type slotDamage struct {
	slot    int
	seq     uint64 // the sequence number its (unauthenticated) header claims, if known
	known   bool   // the header was readable enough to claim a sequence number
	reason  string
	onePass bool // its header says it was written in one pass (version 2, or flagNoSync)
	newer   bool // it may have held a newer record than the one loaded: the TPM rolls back
	allowed bool // newer, loaded all the same (one-pass record, or Options.AcceptRollback)
}

func (d slotDamage) claimed() string {
	if !d.known {
		return "unknown"
	}
	return fmt.Sprint(d.seq)
}

// slotSizeFor returns the slot size for a payload of n bytes: room for a quarter more
// (libtpms' permanent state grows as NV indices and persistent objects are added),
// rounded up to whole pages so that an in-place write touches as few pages as it can.
func slotSizeFor(n int) int {
	need := slotHeaderSize + n + n/4 + 16
	return (need + slotAlign - 1) / slotAlign * slotAlign
}

// sealSlot returns the version-3 record (header and ciphertext, at most size bytes) for
// payload of blob type typ with sequence number seq, bound to state ID id.
func (s *sealer) sealSlot(typ byte, seq uint64, size int, id []byte, flags uint16, payload []byte) ([]byte, error) {
	if len(id) != stateIDSize {
		return nil, fmt.Errorf("state ID of %d bytes, want %d", len(id), stateIDSize)
	}
	n := slotHeaderSize + len(payload) + s.aead.Overhead()
	if n > size {
		return nil, fmt.Errorf("%d-byte record does not fit a %d-byte slot", n, size)
	}
	out := make([]byte, slotHeaderSize, n)
	copy(out, fileMagic)
	out[8] = fileVersionBound
	out[9] = typ
	binary.BigEndian.PutUint16(out[10:], flags)
	copy(out[12:], s.keyID[:])
	if _, err := rand.Read(out[20:32]); err != nil {
		return nil, fmt.Errorf("random nonce: %w", err)
	}
	binary.BigEndian.PutUint64(out[32:], seq)
	binary.BigEndian.PutUint32(out[40:], uint32(size))
	binary.BigEndian.PutUint32(out[44:], uint32(len(payload)))
	copy(out[48:], id)
	copy(out[slotAADSize:], s.headerTag(out[:slotAADSize]))
	return s.aead.Seal(out, out[20:32], payload, out[:slotAADSize]), nil
}

// headerTag is the version-3 header tag of the first slotAADSize header bytes.
func (s *sealer) headerTag(h []byte) []byte {
	m := hmac.New(sha256.New, s.headerKey)
	m.Write(h)
	return m.Sum(nil)[:headerTagSize]
}

// newSlotFile returns a whole slotted file whose slot 0 holds record and slot 1 is
// empty (zeros, which never authenticate).
func newSlotFile(record []byte, size int) []byte {
	f := make([]byte, 2*size)
	copy(f, record)
	return f
}

// slotResult is what one slot holds.
type slotResult struct {
	payload []byte
	seq     uint64
	oneStep bool   // written in one pass (version 2, or flagNoSync): a tear may hit the header
	id      []byte // version 3
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// openSlots decrypts the newest slot of a slotted file that authenticates as blob type
// typ, and reports the slots it passed over. dirID is the directory's state ID (nil if
// it has none). See the format comment above for when a damaged slot refuses the file.
func (s *sealer) openSlots(typ byte, file []byte, dirID []byte, acceptRollback bool) (decoded, error) {
	size := len(file) / 2
	if size < slotHeaderV2+s.aead.Overhead() || len(file)%2 != 0 {
		return decoded{}, fmt.Errorf("%w: %d bytes is not two slots", ErrCorrupt, len(file))
	}
	var (
		res     [2]*slotResult
		damaged []slotDamage
		// the most telling error when no slot opens: another blob type, another
		// directory, a wrong key, damage, then plain garbage
		errType, errKey, errAuth, errShape error
	)
	for i := range 2 {
		rec := file[i*size : (i+1)*size]
		r, dmg, err := s.openSlot(typ, rec, size, i)
		switch {
		case r != nil && r.id != nil && !bytes.Equal(r.id, dirID):
			// Authentic, but bound elsewhere: refuse the whole file whatever the other
			// slot holds (a foreign slot is never mixed with this directory's).
			clear(r.payload)
			for _, o := range res {
				if o != nil {
					clear(o.payload)
				}
			}
			return decoded{}, foreignError(r.id, dirID)
		case r != nil:
			res[i] = r
			continue
		case dmg == nil: // empty slot
			continue
		}
		damaged = append(damaged, *dmg)
		switch {
		case errors.Is(err, ErrBlobType):
			errType = err
		case dmg.reason == reasonKey:
			errKey = err
		case errors.Is(err, ErrAuth):
			errAuth = err
		default:
			errShape = err
		}
	}
	best := -1
	for i, r := range res {
		if r != nil && (best < 0 || r.seq > res[best].seq) {
			best = i
		}
	}
	for i, r := range res {
		if r != nil && i != best {
			clear(r.payload)
		}
	}
	if best < 0 {
		for _, err := range []error{errType, errKey, errAuth, errShape} {
			if err != nil {
				return decoded{}, err
			}
		}
		return decoded{}, fmt.Errorf("%w: neither slot holds a record", ErrCorrupt)
	}
	b := res[best]
	for j := range damaged {
		d := &damaged[j]
		switch {
		case d.known && d.seq < b.seq, d.reason == reasonTorn, d.reason == reasonEmpty:
			// The slot the last write was going to: its old (or still empty) header
			// survived a torn write, or an older record was damaged. Nothing
			// acknowledged is lost.
		case d.known && d.onePass, !d.known && b.oneStep:
			d.newer = true // cannot tell a torn one-pass write from damage: load, loudly
			d.allowed = true
		case acceptRollback:
			d.newer, d.allowed = true, true
		default:
			clear(b.payload)
			return decoded{}, &hinted{ErrRollback, fmt.Sprintf(
				"slot %d claims sequence %s and fails authentication (%s); slot %d holds sequence %d. Records are written body first, header last, so this is damage after the write was acknowledged, not a crash: restore the file from a backup, or accept losing the newest write with --tpmstate ...,accept-rollback (Options.AcceptRollback)",
				d.slot, d.claimed(), d.reason, best, b.seq)}
		}
	}
	return decoded{
		payload: b.payload,
		slots:   &slotInfo{size: size, seq: b.seq, cur: best},
		stateID: b.id,
		damaged: damaged,
	}, nil
}

// Reasons a slot fails, for the log.
const (
	reasonTorn   = "header empty but body written: a first write cut short"
	reasonShape  = "no valid header"
	reasonEmpty  = "an empty slot with damaged header bytes"
	reasonHeader = "header fails authentication"
	reasonType   = "another blob type"
	reasonKey    = "another key id"
	reasonLen    = "payload length does not fit"
	reasonAEAD   = "AES-GCM authentication failed"
)

// openSlot opens one slot: a record (r), an empty slot (all nil), or a damaged one
// (dmg and err).
func (s *sealer) openSlot(typ byte, rec []byte, size, i int) (r *slotResult, dmg *slotDamage, err error) {
	damage := func(reason string, err error) (*slotResult, *slotDamage, error) {
		return nil, &slotDamage{slot: i, reason: reason}, err
	}
	if isZero(rec[:slotHeaderV2]) {
		if isZero(rec) {
			return nil, nil, nil
		}
		return damage(reasonTorn, fmt.Errorf("%w: slot %d: %s", ErrCorrupt, i, reasonTorn))
	}
	// A damaged header over an empty body was never a record (a version-3 record's
	// ciphertext and tag reach past its header): an empty slot whose header bytes were
	// damaged.
	emptyBody := len(rec) > slotHeaderSize && isZero(rec[slotHeaderSize:])
	badHeader := func(reason string, err error) (*slotResult, *slotDamage, error) {
		if emptyBody {
			return damage(reasonEmpty, fmt.Errorf("%w: slot %d: %s", ErrCorrupt, i, reasonEmpty))
		}
		return damage(reason, err)
	}
	ver := rec[8]
	hs, aad := slotHeaderV2, slotHeaderV2
	if ver == fileVersionBound {
		hs, aad = slotHeaderSize, slotAADSize
	}
	flags := binary.BigEndian.Uint16(rec[10:])
	if !bytes.HasPrefix(rec, []byte(fileMagic)) || (ver != fileVersionSlots && ver != fileVersionBound) ||
		len(rec) < hs || flags&^flagNoSync != 0 || (ver == fileVersionSlots && flags != 0) ||
		int(binary.BigEndian.Uint32(rec[40:])) != size {
		return badHeader(reasonShape, fmt.Errorf("%w: slot %d has no valid header", ErrCorrupt, i))
	}
	if !hmac.Equal(rec[12:20], s.keyID[:]) {
		return badHeader(reasonKey, &hinted{ErrAuth, fmt.Sprintf("it was written under key id %x, this key's id is %x: most likely the wrong key", rec[12:20], s.keyID)})
	}
	if ver == fileVersionBound && !hmac.Equal(rec[aad:hs], s.headerTag(rec[:aad])) {
		return badHeader(reasonHeader, &hinted{ErrAuth, "the key id matches, so the file itself is damaged; restore it from a backup"})
	}
	// The header is authentic from here on (version 3), or at least well formed (2).
	seq := binary.BigEndian.Uint64(rec[32:])
	onePass := ver == fileVersionSlots || flags&flagNoSync != 0
	known := func(reason string, err error) (*slotResult, *slotDamage, error) {
		return nil, &slotDamage{slot: i, reason: reason, seq: seq, known: true, onePass: onePass}, err
	}
	if rec[9] != typ {
		return known(reasonType, fmt.Errorf("%w: holds type %d, expected %d", ErrBlobType, rec[9], typ))
	}
	n := int(binary.BigEndian.Uint32(rec[44:]))
	if n > size-hs-s.aead.Overhead() {
		return known(reasonLen, fmt.Errorf("%w: slot %d: payload length %d does not fit", ErrCorrupt, i, n))
	}
	p, err := s.aead.Open(nil, rec[20:32], rec[hs:hs+n+s.aead.Overhead()], rec[:aad])
	if err != nil {
		return known(reasonAEAD, &hinted{ErrAuth, "the key id matches, so the file itself is damaged; restore it from a backup"})
	}
	r = &slotResult{payload: p, seq: seq, oneStep: onePass}
	if ver == fileVersionBound {
		r.id = bytes.Clone(rec[48:64])
	}
	return r, nil, nil
}

// foreignError explains a record bound to state ID got where the directory has want
// (nil: the directory has no state ID file).
func foreignError(got, want []byte) error {
	if want == nil {
		return &hinted{ErrForeign, fmt.Sprintf(
			"the file is bound to state ID %s, and this directory has no %s: if the file belongs here (a directory restored without its dot files), write that ID into %s; if it was copied from another VM's directory, put this VM's own state back",
			hex.EncodeToString(got), stateIDFile, stateIDFile)}
	}
	return &hinted{ErrForeign, fmt.Sprintf(
		"the file is bound to state ID %s, this directory's (%s) is %s: it was copied from another VM's state directory; put this VM's own state back",
		hex.EncodeToString(got), stateIDFile, hex.EncodeToString(want))}
}
