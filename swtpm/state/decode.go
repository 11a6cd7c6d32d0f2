package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/nkp-dev/nkp/swtpm/envelope"
)

// fileFormat names the format decode found a state file in.
type fileFormat int

const (
	formatNKP1       fileFormat = iota + 1 // nkp version 1: one record (nkp-swtpm before c564f8d)
	formatNKPSlots                         // nkp versions 2 and 3: two slots
	formatSwtpm                            // swtpm's blob header, encrypted with --key
	formatSwtpmPlain                       // swtpm's blob header, plaintext
	formatBare                             // no header: a bare libtpms blob (swtpm before its blob header)
	formatBareKey                          // no header: encrypted by swtpm before its blob header (--key)
)

// plain reports whether the format is unencrypted.
func (f fileFormat) plain() bool { return f == formatSwtpmPlain || f == formatBare }

// decodeOpts is what decode needs besides the bytes.
type decodeOpts struct {
	name        string  // blob name: permall, volatilestate, savestate
	seal        *sealer // nil without a key
	key         []byte  // nil without a key
	acceptPlain bool    // a keyed Dir also reads plaintext files (Options.AcceptPlaintext)
	// dirID is the directory's state ID (nil when it has none yet): a slotted record
	// bound to another ID is refused with ErrForeign.
	dirID []byte
	// acceptRollback loads the older slot even when the newer one may hold an
	// acknowledged write (Options.AcceptRollback).
	acceptRollback bool
}

// decoded is what decode found in a state file.
type decoded struct {
	payload []byte
	format  fileFormat
	slots   *slotInfo    // formatNKPSlots: where the newest record is
	stateID []byte       // formatNKPSlots: the newest record's state ID; nil when unbound (version 2)
	damaged []slotDamage // formatNKPSlots: slots that failed authentication and were passed over
}

// decode reads a state file in any format nkp-swtpm or swtpm (up to 0.7.1) wrote. It is
// pure: no I/O, no logging (Dir logs what it reports), and its cost is one AEAD or
// AES-CBC pass over the file — keys are derived before, once per Dir — so that fuzzing
// runs at parser speed.
func decode(file []byte, o decodeOpts) (decoded, error) {
	typ := blobTypes[o.name]
	if bytes.HasPrefix(file, []byte(fileMagic)) {
		if o.seal == nil {
			return decoded{}, ErrNeedKey
		}
		if len(file) > 8 && (file[8] == fileVersionSlots || file[8] == fileVersionBound) {
			r, err := o.seal.openSlots(typ, file, o.dirID, o.acceptRollback)
			if err != nil {
				return decoded{}, err
			}
			r.format = formatNKPSlots
			return r, nil
		}
		p, err := o.seal.open(typ, file)
		return decoded{payload: p, format: formatNKP1}, err
	}
	return decodeSwtpm(file, typ, o)
}

// decodeSwtpm reads swtpm's formats: with its blob header (plaintext, or encrypted with
// --key) and, as swtpm 0.7.1 does for any file whose header does not check, the
// header-less files of swtpm before that header.
func decodeSwtpm(file []byte, typ byte, o decodeOpts) (decoded, error) {
	h, _, herr := envelope.ParseHeader(file)
	if herr != nil {
		return decodeHeaderless(file, typ, o, herr)
	}
	encrypted := h.Flags&envelope.FlagEncrypted != 0
	switch {
	case encrypted && o.key == nil:
		return decoded{}, ErrNeedKey
	case !encrypted && o.key != nil && !o.acceptPlain:
		return decoded{}, ErrPlaintext
	case !encrypted:
		p, err := envelope.DecodeFile(file, nil)
		if err != nil {
			return decoded{}, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		return decoded{payload: p, format: formatSwtpmPlain}, nil
	}
	p, err := envelope.DecodeFile(file, o.key)
	switch {
	case errors.Is(err, envelope.ErrAuth):
		return decoded{}, &hinted{ErrAuth, "a swtpm --key file whose HMAC does not match this key"}
	case errors.Is(err, envelope.ErrKeySize):
		return decoded{}, &hinted{ErrAuth, "a swtpm --key file: " + err.Error()}
	case err != nil:
		return decoded{}, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return decoded{payload: p, format: formatSwtpm}, nil
}

// libtpms' own blob headers (TPM 2.0): u16 version, u32 magic. swtpm before its blob
// header wrote these blobs as they are; the version varies with libtpms' release
// (permall 2 or 3, volatile state 3 or 4 ...), the magic does not.
var libtpmsMagic = map[byte]uint32{
	1: 0xab364723, // PERSISTENT_ALL_MAGIC (permall)
	2: 0x45637889, // VOLATILE_STATE_MAGIC (volatilestate)
}

// isLibtpmsBlob reports whether file starts like libtpms' blob of type typ.
func isLibtpmsBlob(file []byte, typ byte) bool {
	m, ok := libtpmsMagic[typ]
	return ok && len(file) >= 6 && binary.BigEndian.Uint32(file[2:]) == m
}

// headerlessMin is the shortest encrypted header-less file: a SHA-256 and one block.
const headerlessMin = 32 + 16

// decodeHeaderless reads a file without swtpm's blob header, as swtpm 0.7.1 does (its
// SWTPM_NVRAM_LoadData treats a file whose header does not check as "version 1"): with a
// key, AES-CBC over SHA-256(data) || data (envelope.DecodeHeaderless); without, the
// bare libtpms blob. nkp is stricter than swtpm in one way that changes nothing for a
// real state: a plaintext file must start with libtpms' magic for its blob type (swtpm
// hands any bytes to libtpms, which refuses them), so garbage gets a clear error here.
func decodeHeaderless(file []byte, typ byte, o decodeOpts, herr error) (decoded, error) {
	bare := isLibtpmsBlob(file, typ)
	cipherShaped := len(file) >= headerlessMin && len(file)%16 == 0
	switch {
	case o.key != nil && !bare && cipherShaped:
		p, err := envelope.DecodeHeaderless(file, o.key)
		if err != nil {
			return decoded{}, &hinted{ErrAuth, "no swtpm header, so read as a file that swtpm encrypted before it had one (--key); its SHA-256 check fails under this key: the wrong key (swtpm of that era took 128-bit keys, and pwdfile= derived them with kdf=sha512), or a damaged file"}
		}
		return decoded{payload: p, format: formatBareKey}, nil
	case bare && o.key != nil && !o.acceptPlain:
		return decoded{}, &hinted{ErrPlaintext, "a bare libtpms blob, written unencrypted by swtpm before its blob header"}
	case bare:
		return decoded{payload: bytes.Clone(file), format: formatBare}, nil
	case o.key == nil && cipherShaped:
		return decoded{}, &hinted{ErrNeedKey, fmt.Sprintf("no swtpm header (%v) and no libtpms magic: a file that swtpm encrypted before it had a blob header, or a damaged one", herr)}
	}
	return decoded{}, fmt.Errorf("%w: neither a swtpm blob (%w) nor a bare libtpms %s blob", ErrCorrupt, herr, Names[typ-1])
}
