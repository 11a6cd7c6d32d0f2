package swtpmtools

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	migKey := hexKeyFile(t)
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

// TestSwtpmStateDirectory starts nkp-swtpm on a state directory that Debian's swtpm
// wrote (plaintext, with a key file, with a passphrase): the NV value swtpm's TPM held
// is there, so a VM moving from swtpm to nkp-swtpm keeps its TPM (EK, NV, sealed keys).
// Plaintext state stays in swtpm's format, so it also goes back to swtpm.
func TestSwtpmStateDirectory(t *testing.T) {
	e2e.Require(t, "swtpm", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
	swtpmBE, nkp := backends[0], backends[1]
	keyFile, pwdFile := hexKeyFile(t), passphraseFile(t)
	value := []byte("written by swtpm, read by nkp")
	for _, tt := range []struct {
		name string
		key  []string
	}{
		{"plaintext", nil},
		{"key file", []string{"--key", "file=" + keyFile + ",mode=aes-256-cbc"}},
		{"passphrase", []string{"--key", "pwdfile=" + pwdFile + ",mode=aes-256-cbc"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			state, work := t.TempDir(), t.TempDir()
			p := start(t, swtpmBE, procOpts{stateDir: state, extra: append(tt.key, startupFlags...)})
			nvWrite(t, p.TCTI(), work, value)
			p.Stop()

			p = start(t, nkp, procOpts{stateDir: state, extra: append(tt.key, startupFlags...)})
			if got := nvRead(t, p.TCTI(), len(value)); !bytes.Equal(got, value) {
				t.Fatalf("nkp-swtpm reads %q from swtpm's state, want %q", got, value)
			}
			// A write makes nkp-swtpm store the state itself.
			in := filepath.Join(work, "again")
			if err := os.WriteFile(in, value, 0o600); err != nil {
				t.Fatal(err)
			}
			mustRun(t, p.TCTI(), "tpm2_nvwrite", nvIndex, "-C", "o", "-i", in)
			p.Stop()
			if tt.key != nil {
				return
			}
			p = start(t, swtpmBE, procOpts{stateDir: state, extra: startupFlags})
			if got := nvRead(t, p.TCTI(), len(value)); !bytes.Equal(got, value) {
				t.Fatalf("swtpm reads %q back from nkp-swtpm's plaintext state, want %q", got, value)
			}
		})
	}
}

// TestSharedStorageMigration plays libvirt's migration on shared storage: the source
// runs with --migration release-lock-outgoing and gives up the state directory's lock
// when the savestate blob is read, so that a destination started (before that) with
// --migration incoming on the same directory takes it at CMD_INIT and loads the blobs.
func TestSharedStorageMigration(t *testing.T) {
	e2e.Require(t, "swtpm_ioctl", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
	forEachBackend(t, func(t *testing.T, be backend) {
		if !hasFeature(t, be, "cmdarg-migration") {
			t.Skipf("%s does not report cmdarg-migration (newer swtpm releases have it)", be.name)
		}
		sharedStorageMigration(t, be, procOpts{stateDir: t.TempDir()})
		if hasFeature(t, be, "nvram-backend-file") {
			t.Run("linear file", func(t *testing.T) {
				sharedStorageMigration(t, be, procOpts{stateFile: filepath.Join(t.TempDir(), "tpm.img")})
			})
		}
	})
}

// sharedStorageMigration migrates a TPM between two processes of be on the state that
// base names (a directory or a linear file).
func sharedStorageMigration(t *testing.T, be backend, base procOpts) {
	work := t.TempDir()
	with := func(extra ...string) procOpts {
		o := base
		o.extra = extra
		return o
	}
	value := []byte("shared storage")
	src := start(t, be, with(append([]string{"--migration", "release-lock-outgoing"}, startupFlags...)...))
	nvWrite(t, src.TCTI(), work, value)

	// Before the blobs are read, the state is locked.
	early := startNoWait(t, be, with(startupFlags...))
	if err := early.Wait(10 * time.Second); err == nil {
		t.Fatalf("a second backend ran on the source's locked state")
	}

	// The destination starts while the source still holds the lock, as libvirt
	// starts it before the migration; it locks the state only at CMD_INIT.
	dst := start(t, be, with("--migration", "incoming"))

	blobs := map[string]string{}
	for _, typ := range []string{"permanent", "volatile", "savestate"} {
		blobs[typ] = filepath.Join(work, typ)
		out, err := runTool(t, nil, "swtpm_ioctl", "--unix", src.Ctrl, "--save", typ, blobs[typ])
		if err != nil && typ != "savestate" { // a TPM 2 has no savestate blob (0x800)
			t.Fatalf("--save %s: %v\n%s", typ, err, out)
		}
	}

	mustRun(t, nil, "swtpm_ioctl", "--unix", dst.Ctrl, "--stop")
	for _, typ := range []string{"permanent", "volatile"} {
		mustRun(t, nil, "swtpm_ioctl", "--unix", dst.Ctrl, "--load", typ, blobs[typ])
	}
	mustRun(t, nil, "swtpm_ioctl", "--unix", dst.Ctrl, "-i")
	src.Kill()
	if got := nvRead(t, dst.TCTI(), len(value)); !bytes.Equal(got, value) {
		t.Errorf("NV on the destination = %q, want %q", got, value)
	}
}
