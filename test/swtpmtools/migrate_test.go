package swtpmtools

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/test/e2e"
)

// TestStateBlobsAcrossBackends moves a running TPM's state between swtpm and nkp-swtpm
// in both directions with swtpm_ioctl --save (GET_STATEBLOB) and --load (SET_STATEBLOB),
// the path QEMU's migration stream takes: the NV value and a PCR extended before the
// move are there afterwards, without a new TPM2_Startup. This is what lets a VM
// live-migrate between a swtpm host and an nkp host.
func TestStateBlobsAcrossBackends(t *testing.T) {
	e2e.Require(t, "swtpm", "swtpm_ioctl", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread", "tpm2_pcrextend", "tpm2_pcrread")
	pairs := []struct{ from, to backend }{
		{backends[0], backends[1]},
		{backends[1], backends[0]},
		{backends[1], backends[1]},
	}
	value := []byte("state that crosses backends")
	digest := sha256.Sum256([]byte("measured before the move"))
	pcr := sha256.Sum256(append(make([]byte, 32), digest[:]...))
	migKey := filepath.Join(t.TempDir(), "migkey")
	k := make([]byte, 32)
	rand.Read(k)
	if err := os.WriteFile(migKey, []byte(hex.EncodeToString(k)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, pair := range pairs {
		for _, withKey := range []bool{false, true} {
			name := pair.from.name + " to " + pair.to.name
			var keyOpt []string
			if withKey {
				name += " with a migration key"
				keyOpt = []string{"--migration-key", "file=" + migKey + ",mode=aes-256-cbc"}
			}
			t.Run(name, func(t *testing.T) { moveState(t, pair.from, pair.to, keyOpt, value, digest[:], pcr[:]) })
		}
	}
}

// moveState runs one move of TestStateBlobsAcrossBackends.
func moveState(t *testing.T, from, to backend, keyOpt []string, value, digest, pcr []byte) {
	work := t.TempDir()
	src := start(t, from, procOpts{stateDir: t.TempDir(), extra: append(keyOpt, startupFlags...)})
	nvWrite(t, src.TCTI(), work, value)
	mustRun(t, src.TCTI(), "tpm2_pcrextend", "16:sha256="+hex.EncodeToString(digest))
	blobs := map[string]string{}
	for _, typ := range []string{"permanent", "volatile"} {
		blobs[typ] = filepath.Join(work, typ)
		mustRun(t, nil, "swtpm_ioctl", "--unix", src.Ctrl, "--save", typ, blobs[typ])
		b, _ := os.ReadFile(blobs[typ])
		switch plain := bytes.Contains(b, value); {
		case len(keyOpt) > 0 && plain:
			t.Errorf("the %s blob holds the NV value in plaintext despite the migration key", typ)
		case len(keyOpt) == 0 && typ == "permanent" && !plain:
			t.Errorf("the plain permanent blob does not hold the NV value: the search cannot work")
		}
	}
	src.Kill()

	dst := start(t, to, procOpts{stateDir: t.TempDir(), extra: keyOpt})
	mustRun(t, nil, "swtpm_ioctl", "--unix", dst.Ctrl, "--stop")
	for _, typ := range []string{"permanent", "volatile"} {
		mustRun(t, nil, "swtpm_ioctl", "--unix", dst.Ctrl, "--load", typ, blobs[typ])
	}
	mustRun(t, nil, "swtpm_ioctl", "--unix", dst.Ctrl, "-i")
	if got := nvRead(t, dst.TCTI(), len(value)); !bytes.Equal(got, value) {
		t.Errorf("NV after the move = %q, want %q", got, value)
	}
	out := mustRun(t, dst.TCTI(), "tpm2_pcrread", "sha256:16")
	if !strings.Contains(strings.ToLower(out), hex.EncodeToString(pcr)) {
		t.Errorf("PCR 16 after the move = %q, want 0x%X", out, pcr)
	}
}
