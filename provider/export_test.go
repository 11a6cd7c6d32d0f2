package provider

import (
	"context"
	"io"

	"filippo.io/age"

	"github.com/nkp-dev/nkp/provider/backup"
)

// CheapBackups makes the provider Open gives write archives at scrypt work factor 10
// instead of age's default 18 (about 300 times cheaper), so tests take many backups
// quickly. Production code has no way to do this.
func CheapBackups(c *Config) { c.writeArchive = writeCheap }

func writeCheap(w io.Writer, passphrase []byte, d *backup.Document) (int64, error) {
	if err := backup.CheckPassphrase(passphrase); err != nil {
		return 0, err
	}
	plain, err := backup.Marshal(d)
	if err != nil {
		return 0, err
	}
	defer clear(plain)
	rcpt, err := age.NewScryptRecipient(string(passphrase))
	if err != nil {
		return 0, err
	}
	rcpt.SetWorkFactor(10)
	cw := &countingWriter{w: w}
	enc, err := age.Encrypt(cw, rcpt)
	if err != nil {
		return cw.n, err
	}
	if _, err := enc.Write(plain); err != nil {
		return cw.n, err
	}
	err = enc.Close()
	return cw.n, err
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Release releases host hostID's KDKs as ReleaseTo does, without a certificate (tests
// that are about the release, not the authentication, call it).
func (p *Provider) Release(ctx context.Context, hostID string) ([]ReleasedKDK, error) {
	out, _, err := p.release(ctx, hostID)
	return out, err
}
