package swtpmtools

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pcr10Test is what upstream's `pcrextend -ha 10 -ic test` extends PCR 10's SHA-256
// bank with: "test", zero-padded to the digest size (PCR 10 then reads f68598e5...).
const pcr10Test = "74657374" + "00000000000000000000000000000000000000000000000000000000"

// upstreamMigrationPassword is the migration key passphrase of
// _test_tpm2_migration_key (its MIGRATION_PASSWORD).
const upstreamMigrationPassword = "migration"

// makeUpstreamData writes into dataDir the state files that swtpm's scripts copy from
// tests/data, which upstream checks in as binaries of its own making. They are made
// here with Debian's swtpm (the control backend), each the way the scripts expect it:
//
//	tpm2state1/   a TPM after Startup(CLEAR) with PCR 10 extended once with "test" and
//	              its volatile state stored (swtpm_ioctl -v): tpm2-00.permall and
//	              tpm2-00.volatilestate, not encrypted;
//	tpm2state2/   the same, encrypted with --key pwdfile=pwdfile.txt,kdf=sha512 (the
//	              passphrase file is in the directory, as upstream's is);
//	tpm2state2b/  the same, encrypted with --key pwdfile=pwdfile.txt,mode=aes-256-cbc;
//	migkey1/tpm2-volatilestate.bin  tpm2state1's volatile state as a blob
//	              (swtpm_ioctl --save volatile) encrypted with the migration key
//	              "migration" (kdf=sha512);
//	keyfile.txt, keyfile256bit.txt, pwdfile.txt  a 128-bit and a 256-bit key in
//	              hex and a passphrase, for swtpm_setup --keyfile and --pwdfile.
func makeUpstreamData(t *testing.T, dataDir string) {
	t.Helper()
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"keyfile.txt":       "000102030405060708090a0b0c0d0e0f",
		"keyfile256bit.txt": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
		"pwdfile.txt":       "nkp upstream test passphrase",
	} {
		if err := os.WriteFile(filepath.Join(dataDir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	swtpm := backends[0]
	if swtpm.name != "swtpm" {
		t.Fatalf("backends[0] is %s, not Debian's swtpm", swtpm.name)
	}
	states := []struct {
		dir string
		key string // --key, with PWDFILE for the passphrase file's path
	}{
		{dir: "tpm2state1"},
		{dir: "tpm2state2", key: "pwdfile=PWDFILE,kdf=sha512"},
		{dir: "tpm2state2b", key: "pwdfile=PWDFILE,mode=aes-256-cbc"},
	}
	for _, s := range states {
		dir := filepath.Join(dataDir, s.dir)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		extra := append([]string(nil), startupFlags...)
		if s.key != "" {
			pwd := filepath.Join(dir, "pwdfile.txt")
			if err := os.WriteFile(pwd, []byte("nkp upstream test "+s.dir), 0o600); err != nil {
				t.Fatal(err)
			}
			extra = append(extra, "--key", strings.ReplaceAll(s.key, "PWDFILE", pwd))
		}
		p := start(t, swtpm, procOpts{stateDir: dir, extra: extra})
		mustRun(t, p.TCTI(), "tpm2_pcrextend", "10:sha256="+pcr10Test)
		mustRun(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-v")
		mustRun(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-s")
		if err := p.Wait(30 * time.Second); err != nil {
			t.Fatalf("swtpm making %s: %v; log: %s", s.dir, err, p.logText())
		}
		os.Remove(filepath.Join(dir, ".lock"))
		for _, f := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				t.Fatalf("swtpm did not write %s/%s: %v", s.dir, f, err)
			}
		}
	}

	// migkey1: resume tpm2state1 (a copy: INIT consumes the volatile state file) in a
	// swtpm with the migration key and save its volatile state blob.
	state := t.TempDir()
	for _, f := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
		b, err := os.ReadFile(filepath.Join(dataDir, "tpm2state1", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(state, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	migpwd := filepath.Join(t.TempDir(), "migpwd")
	if err := os.WriteFile(migpwd, []byte(upstreamMigrationPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	p := start(t, swtpm, procOpts{stateDir: state, extra: []string{"--migration-key", "pwdfile=" + migpwd + ",remove=false,kdf=sha512"}})
	mustRun(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-i")
	blob := filepath.Join(dataDir, "migkey1", "tpm2-volatilestate.bin")
	if err := os.MkdirAll(filepath.Dir(blob), 0o700); err != nil {
		t.Fatal(err)
	}
	mustRun(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "--save", "volatile", blob)
	mustRun(t, nil, "swtpm_ioctl", "--unix", p.Ctrl, "-s")
	if err := p.Wait(30 * time.Second); err != nil {
		t.Fatalf("swtpm making migkey1: %v; log: %s", err, p.logText())
	}
}
