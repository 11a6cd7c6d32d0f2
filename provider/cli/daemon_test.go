package cli

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

func TestRunRefusals(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"bad log level", []string{"init", "--dir", filepath.Join(dir, "a"), "--log-level", "loud"}, "--log-level"},
		{"bad log format", []string{"init", "--dir", filepath.Join(dir, "b"), "--log-format", "xml"}, "--log-format"},
		{"unknown store", []string{"init", "--dir", filepath.Join(dir, "c"), "--store", "redis"}, "--store"},
		{"etcd without endpoints", []string{"serve", "--dir", dir, "--store", "etcd"}, "--etcd-endpoints"},
		{"serve without a provider", []string{"serve", "--dir", filepath.Join(dir, "none"), "--listen", "127.0.0.1:0"}, "nkp-provider init"},
		{"https etcd without a CA", []string{"init", "--dir", filepath.Join(dir, "d"), "--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:1"}, "--etcd-cacert"},
		{"etcd client cert without key", []string{"serve", "--dir", dir, "--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:1", "--etcd-cacert", "ca.pem", "--etcd-cert", "c.pem"}, "--etcd-key"},
		{"bad root key TPM", []string{"init", "--dir", filepath.Join(dir, "e"), "--root-key-tpm", "tpm0"}, "/dev/tpmrm0"},
		{"passphrase flag does not exist", []string{"serve", "--passphrase", "x"}, "unknown flag"},
		{"backup work factor is no flag", []string{"serve", "--dir", dir, "--backup-work-factor", "1"}, "unknown flag"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			err := Main(tc.args, &out, &errb)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run(%v) = %v, want an error naming %q", tc.args, err, tc.want)
			}
		})
	}
}

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "p")
	var out, errb bytes.Buffer
	if err := Main([]string{"init", "--dir", dir, "--log-format", "text"}, &out, &errb); err != nil {
		t.Fatalf("init: %v\n%s", err, errb.String())
	}
	if !strings.Contains(out.String(), "take a backup") {
		t.Fatalf("init printed %q, want the backup reminder", out.String())
	}
	if err := Main([]string{"init", "--dir", dir, "--log-format", "text"}, &out, &errb); err == nil {
		t.Fatal("a second init in the same directory succeeded")
	}
}
