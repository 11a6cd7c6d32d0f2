package envelope

import (
	"crypto/pbkdf2"
	"crypto/sha512"
	"fmt"
)

// KDF names how swtpm turns a passphrase (--key pwdfile=|pwdfd=) into a key.
type KDF string

// The KDFs of swtpm's kdf= sub-option.
const (
	KDFPBKDF2 KDF = "pbkdf2" // default: PBKDF2-HMAC-SHA512, salt "swtpm", 1000 iterations
	KDFSHA512 KDF = "sha512" // the first keyLen bytes of SHA-512(passphrase)
)

// pbkdf2Salt and pbkdf2Iter are swtpm's fixed parameters (src/swtpm/key.c).
const (
	pbkdf2Salt = "swtpm"
	pbkdf2Iter = 1000
)

// DeriveKey derives a keyLen-byte key (16 or 32) from passphrase as swtpm does. The
// passphrase is the whole content of the file or fd, a trailing newline included. The
// caller wipes both the passphrase and the key.
func DeriveKey(passphrase []byte, keyLen int, kdf KDF) ([]byte, error) {
	if keyLen != 16 && keyLen != 32 {
		return nil, fmt.Errorf("derive key: %w: %d bytes requested, want 16 or 32", ErrKeySize, keyLen)
	}
	switch kdf {
	case KDFPBKDF2, "":
		// pbkdf2.Key fails only for parameters outside FIPS 140 limits when FIPS mode
		// is on (a passphrase shorter than 14 bytes); say so.
		k, err := pbkdf2.Key(sha512.New, string(passphrase), []byte(pbkdf2Salt), pbkdf2Iter, keyLen)
		if err != nil {
			return nil, fmt.Errorf("derive key: PBKDF2-HMAC-SHA512: %w", err)
		}
		return k, nil
	case KDFSHA512:
		sum := sha512.Sum512(passphrase)
		k := append([]byte{}, sum[:keyLen]...)
		clear(sum[:])
		return k, nil
	default:
		return nil, fmt.Errorf("derive key: unknown kdf %q; use pbkdf2 or sha512", kdf)
	}
}
