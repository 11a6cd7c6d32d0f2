package vm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/swtpm/envelope"
	"github.com/nkp-dev/nkp/swtpm/state"
)

// swtpmSecretKey reads libvirt secret secretUUID and derives the key libvirt's swtpm
// uses with it (pwdfd, aes-256-cbc).
func (m *Manager) swtpmSecretKey(ctx context.Context, name, secretUUID string) (*state.Key, error) {
	pw, err := m.cfg.Libvirt.SecretValue(ctx, secretUUID)
	if err != nil {
		return nil, fmt.Errorf("vm %q: its vTPM state was encrypted by libvirt under secret %s before protect, and unprotect --tpm keep encrypts it under that secret again, but the secret cannot be read (%w): define it again with its old value (virsh secret-define, virsh secret-set-value), or drop the vTPM with --tpm none; nothing was changed", name, secretUUID, err)
	}
	defer clear(pw)
	key, err := passphraseKey(pw)
	if err != nil {
		return nil, fmt.Errorf("vm %q: libvirt secret %s: %w; nothing was changed", name, secretUUID, err)
	}
	return key, nil
}

// writeEmulatorState writes blobs as libvirt's swtpm state in the new directory dir:
// swtpm's own file format, encrypted with key (swtpm's AES-CBC + HMAC, what swtpm
// writes with --key pwdfd=…) or plaintext when key is nil, read back, and given to
// libvirt's swtpm user.
func (m *Manager) writeEmulatorState(dir string, key *state.Key, blobs map[string][]byte) error {
	if key == nil {
		return m.writeState(dir, nil, blobs, m.cfg.SwtpmOwner, 0o711)
	}
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o711); err != nil {
		return err
	}
	if m.cfg.SwtpmOwner != nil {
		if err := rootParent(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	for _, n := range state.Names {
		b, ok := blobs[n]
		if !ok {
			continue
		}
		file, err := envelope.EncodeFile(b, key.Bytes())
		if err != nil {
			return fmt.Errorf("state directory %s: %s: %w", dir, n, err)
		}
		if err := atomicfile.WriteFile(filepath.Join(dir, state.FileName(n)), file, 0o600); err != nil {
			return fmt.Errorf("state directory %s: writing %s: %w", dir, n, err)
		}
	}
	// Read back as libvirt's swtpm will, with the key only (no plaintext accepted).
	d, err := state.Open(dir, state.Options{Key: key, Log: m.log})
	if err != nil {
		return err
	}
	for n, want := range blobs {
		got, err := d.Load(n)
		same := err == nil && string(got) == string(want)
		clear(got)
		if !same {
			d.Close()
			return fmt.Errorf("state directory %s: %s read back differs from what was written (%v)", dir, n, err)
		}
	}
	if err := d.Close(); err != nil {
		return err
	}
	os.Remove(filepath.Join(dir, ".lock"))
	if m.cfg.SwtpmOwner != nil {
		if err := chownTree(dir, *m.cfg.SwtpmOwner); err != nil {
			return err
		}
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(parent); err != nil {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(parent))
}
