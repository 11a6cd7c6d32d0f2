package backup

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzParse feeds arbitrary plaintext to the document parser: it must return a
// document that validates, or an error wrapping ErrBadArchive, and never panic.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Parse(data)
		if err != nil {
			if !errors.Is(err, ErrBadArchive) {
				t.Fatalf("Parse error does not wrap ErrBadArchive: %v", err)
			}
			return
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("Parse returned a document that does not validate: %v", err)
		}
	})
}

// FuzzRead feeds arbitrary bytes to the archive reader with the passphrase "fuzz" (the
// seeds are archives made with it at a low work factor).
func FuzzRead(f *testing.F) {
	f.Add([]byte("age-encryption.org/v1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, _, err := read(bytes.NewReader(data), []byte("fuzz"), 12)
		if err != nil {
			if !errors.Is(err, ErrBadArchive) && !errors.Is(err, ErrBadPassphrase) {
				t.Fatalf("Read error is neither ErrBadArchive nor ErrBadPassphrase: %v", err)
			}
			return
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("Read returned a document that does not validate: %v", err)
		}
	})
}
