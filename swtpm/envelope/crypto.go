package envelope

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
)

// checkKey accepts the key sizes swtpm supports: AES-128 and AES-256.
func checkKey(key []byte) error {
	if len(key) != 16 && len(key) != 32 {
		return fmt.Errorf("%w: key is %d bytes, want 16 or 32", ErrKeySize, len(key))
	}
	return nil
}

// encrypt is swtpm's SWTPM_NVRAM_EncryptData: a random IV as long as the key (AES-CBC
// uses its first 16 bytes), the plaintext padded PKCS#7-style to a multiple of the key
// length, and HMAC-SHA256 under the same key over ciphertext || IV. It returns the
// items {dataTag: ciphertext, HMAC, ivTag: IV} in swtpm's order.
func encrypt(key, plain []byte, dataTag, ivTag uint16) ([]TLV, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("envelope: AES key: %w", err)
	}
	iv := make([]byte, len(key))
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("envelope: random IV: %w", err)
	}
	pad := len(key) - len(plain)%len(key)
	ct := make([]byte, len(plain)+pad)
	copy(ct, plain)
	for i := len(plain); i < len(ct); i++ {
		ct[i] = byte(pad)
	}
	cipher.NewCBCEncrypter(block, iv[:aes.BlockSize]).CryptBlocks(ct, ct)
	return []TLV{{dataTag, ct}, {TagHMAC, mac(key, ct, iv)}, {ivTag, iv}}, nil
}

func mac(key, ct, iv []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(ct)
	m.Write(iv)
	return m.Sum(nil)
}

// decrypt is swtpm's SWTPM_NVRAM_DecryptData for envelope versions 1 and 2. key256 is
// the header's 256-bit flag for this layer; the key must have that size.
func decrypt(key, body []byte, dataTag, ivTag uint16, version uint8, key256 bool) ([]byte, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	if version == 1 {
		return decryptV1(key, body)
	}
	want := 16
	if key256 {
		want = 32
	}
	if len(key) != want {
		return nil, fmt.Errorf("%w: the blob was encrypted with a %d-bit key, the key given is %d-bit", ErrKeySize, want*8, len(key)*8)
	}
	tag, ok := Find(body, TagHMAC)
	if !ok {
		return nil, fmt.Errorf("%w: no HMAC TLV", ErrMalformed)
	}
	ct, ok := Find(body, dataTag)
	if !ok {
		return nil, fmt.Errorf("%w: no encrypted data TLV %d", ErrMalformed, dataTag)
	}
	iv, hasIV := Find(body, ivTag)
	if len(tag) < sha256.Size {
		return nil, fmt.Errorf("%w: HMAC TLV is %d bytes", ErrMalformed, len(tag))
	}
	if subtle.ConstantTimeCompare(tag[:sha256.Size], mac(key, ct, iv)) != 1 {
		return nil, ErrAuth
	}
	// Checked after the HMAC, as swtpm does (its decrypt step refuses the IV then).
	if hasIV && len(iv) != len(key) {
		return nil, fmt.Errorf("%w: IV is %d bytes, want %d", ErrAuth, len(iv), len(key))
	}
	var ivec [aes.BlockSize]byte
	copy(ivec[:], iv)
	return cbcDecrypt(key, ivec[:], ct)
}

// decryptV1 reads the version-1 format: AES-CBC with a zero IV over SHA-256(data) || data.
func decryptV1(key, ct []byte) ([]byte, error) {
	p, err := cbcDecrypt(key, make([]byte, aes.BlockSize), ct)
	if err != nil {
		return nil, err
	}
	if len(p) < sha256.Size {
		return nil, fmt.Errorf("%w: version-1 payload shorter than its hash", ErrAuth)
	}
	sum := sha256.Sum256(p[sha256.Size:])
	if subtle.ConstantTimeCompare(sum[:], p[:sha256.Size]) != 1 {
		return nil, ErrAuth
	}
	return p[sha256.Size:], nil
}

// cbcDecrypt decrypts and strips swtpm's padding (1..keylen bytes, each the pad length).
func cbcDecrypt(key, iv, ct []byte) ([]byte, error) {
	if len(ct) < len(key) || len(ct)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("%w: ciphertext of %d bytes is not whole blocks", ErrAuth, len(ct))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("envelope: AES key: %w", err)
	}
	p := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(p, ct)
	pad := int(p[len(p)-1])
	if pad == 0 || pad > len(key) {
		return nil, fmt.Errorf("%w: bad padding", ErrAuth)
	}
	for _, b := range p[len(p)-pad:] {
		if int(b) != pad {
			return nil, fmt.Errorf("%w: bad padding", ErrAuth)
		}
	}
	return p[:len(p)-pad], nil
}
