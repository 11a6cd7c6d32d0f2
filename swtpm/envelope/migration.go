package envelope

import "fmt"

// ForMigration wraps libtpms' state blob data as GET_STATEBLOB returns it, with no
// state-key layer: it is ForMigrationWithStateKey(data, migKey, nil, decrypted).
// migKey may be nil. It returns the reply's flags too.
func ForMigration(data []byte, migKey []byte, decrypted bool) (blob []byte, flags uint32, err error) {
	return ForMigrationWithStateKey(data, migKey, nil, decrypted)
}

// ForMigrationWithStateKey wraps data as swtpm's SWTPM_NVRAM_GetStateBlob does:
//
//   - the inner layer is TLV DATA, or — when the request did not ask for DECRYPTED and
//     a state key is set — TLVs {ENCRYPTED_DATA, HMAC, IV} under stateKey, and the reply
//     flags then carry StateFlagEncrypted;
//   - the outer layer is TLV MIGRATION_DATA holding the inner layer, or with a
//     migration key TLVs {ENCRYPTED_MIGRATION_DATA, HMAC, MIGRATION_IV};
//   - the header flags say MIGRATION_DATA and which layers are encrypted with which key
//     size.
//
// migKey and stateKey may be nil; when set they must be 16 or 32 bytes.
func ForMigrationWithStateKey(data, migKey, stateKey []byte, decrypted bool) (blob []byte, flags uint32, err error) {
	var hdr uint16
	var inner []byte
	encrypted := !decrypted && stateKey != nil
	if encrypted {
		items, err := encrypt(stateKey, data, TagEncryptedData, TagIV)
		if err != nil {
			return nil, 0, fmt.Errorf("migration blob: state key layer: %w", err)
		}
		inner = AppendTLVs(nil, items...)
		hdr |= FlagEncrypted
		if len(stateKey) == 32 {
			hdr |= FlagStateKey256
		}
		flags = StateFlagEncrypted
	} else {
		inner = AppendTLVs(nil, TLV{TagData, data})
	}
	var outer []TLV
	if migKey != nil {
		outer, err = encrypt(migKey, inner, TagEncryptedMigrationData, TagMigrationIV)
		if !encrypted {
			clear(inner) // a plaintext copy of the state
		}
		if err != nil {
			return nil, 0, fmt.Errorf("migration blob: migration key layer: %w", err)
		}
		hdr |= FlagMigrationEncrypted
		if len(migKey) == 32 {
			hdr |= FlagMigrationKey256
		}
	} else {
		outer = []TLV{{TagMigrationData, inner}}
	}
	hdr |= FlagMigrationData
	return Encode(hdr, outer...), flags, nil
}

// FromMigration unwraps a SET_STATEBLOB payload to libtpms' blob, as swtpm's
// SWTPM_NVRAM_SetStateBlob does. reqFlags are the request's flags (StateFlagEncrypted
// says the inner layer is encrypted with the state key even if the header does not).
// An empty blob, or an envelope with an empty body, returns nil: the caller clears
// that state. migKey and stateKey may be nil; a layer encrypted for a missing key gives
// an error wrapping ErrKeyNotFound. A blob that was not encrypted with the migration key
// is accepted even when one is set ("upgrade" to encryption, as swtpm allows).
func FromMigration(blob []byte, reqFlags uint32, migKey, stateKey []byte) ([]byte, error) {
	if len(blob) == 0 {
		return nil, nil
	}
	h, body, err := ParseHeader(blob)
	if err != nil {
		return nil, fmt.Errorf("migration blob: %w", err)
	}
	if len(body) == 0 {
		return nil, nil
	}
	var inner []byte
	if h.Flags&FlagMigrationEncrypted != 0 {
		if migKey == nil {
			return nil, fmt.Errorf("migration blob: %w: it is encrypted with a migration key; pass the same --migration-key as the source", ErrKeyNotFound)
		}
		inner, err = decrypt(migKey, body, TagEncryptedMigrationData, TagMigrationIV, h.Version, h.Flags&FlagMigrationKey256 != 0)
		if err != nil {
			return nil, fmt.Errorf("migration blob: migration key layer: %w", err)
		}
	} else {
		inner, err = plainData(body, TagMigrationData, h.Version)
		if err != nil {
			return nil, fmt.Errorf("migration blob: %w", err)
		}
	}
	if reqFlags&StateFlagEncrypted != 0 || h.Flags&FlagEncrypted != 0 {
		if stateKey == nil {
			return nil, fmt.Errorf("migration blob: %w: its data are encrypted with a state key; pass the same --key as the source", ErrKeyNotFound)
		}
		out, err := decrypt(stateKey, inner, TagEncryptedData, TagIV, h.Version, h.Flags&FlagStateKey256 != 0)
		if err != nil {
			return nil, fmt.Errorf("migration blob: state key layer: %w", err)
		}
		return out, nil
	}
	out, err := plainData(inner, TagData, h.Version)
	if h.Flags&FlagMigrationEncrypted != 0 {
		clear(inner) // decrypted here: a plaintext copy of the state
	}
	if err != nil {
		return nil, fmt.Errorf("migration blob: %w", err)
	}
	return out, nil
}
