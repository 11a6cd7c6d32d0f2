package cli

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/backup"
)

func TestPassphraseSource(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "pass")
	if err := os.WriteFile(file, []byte("from file\nsecond line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "world-readable")
	if err := os.WriteFile(open, []byte("from file\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o644); err != nil { // whatever the umask
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		src     passphraseSource
		stdin   string
		want    string
		wantErr string
	}{
		{"file, first line", passphraseSource{file: file}, "", "from file", ""},
		{"stdin", passphraseSource{stdin: true}, "typed\r\n", "typed", ""},
		{"stdin without newline", passphraseSource{stdin: true}, "typed", "typed", ""},
		{"both", passphraseSource{file: file, stdin: true}, "", "", "choose one"},
		{"missing file", passphraseSource{file: filepath.Join(dir, "nope")}, "", "", "--passphrase-file"},
		{"empty file", passphraseSource{file: empty}, "", "", "empty passphrase"},
		{"file readable by others", passphraseSource{file: open}, "", "", "chmod 600 " + open},
		{"no terminal", passphraseSource{}, "", "", "--passphrase-file FILE or --passphrase-stdin"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.src.read(strings.NewReader(tc.stdin), &bytes.Buffer{}, false)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("read = %q, %v; want error %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || string(got) != tc.want {
				t.Fatalf("read = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestParsePolicy(t *testing.T) {
	tests := []struct {
		in      string
		want    apiv1.Policy
		wantErr bool
	}{
		{"tpm-required=on", apiv1.Policy{TPMRequired: true}, false},
		{"tpm-required=off", apiv1.Policy{}, false},
		{"tpm-required=true", apiv1.Policy{TPMRequired: true}, false},
		{"tpm-required=maybe", apiv1.Policy{}, true},
		{"tpm=on", apiv1.Policy{}, true},
		{"tpm-required", apiv1.Policy{}, true},
	}
	for _, tc := range tests {
		got, err := parsePolicy(tc.in)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("parsePolicy(%q) = %+v, %v; want %+v, err=%v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}

// TestNoPassphraseInArgv: there is no flag that takes a passphrase value.
func TestNoPassphraseInArgv(t *testing.T) {
	var out, errb bytes.Buffer
	err := runCtl(context.Background(), []string{"backup", "--passphrase", "x", "--out", "f"}, strings.NewReader(""), &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "unknown flag") {
		t.Fatalf("--passphrase accepted: %v", err)
	}
}

// TestBackupRefusesWeakPassphrase: nkpctl refuses a weak passphrase for a new backup,
// stating the rule, before it contacts the provider.
func TestBackupRefusesWeakPassphrase(t *testing.T) {
	dir := t.TempDir()
	pass := filepath.Join(dir, "pass")
	if err := os.WriteFile(pass, []byte("hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "b.age")
	var stdout, stderr bytes.Buffer
	// No provider listens at this URL, and --dir has no admin credentials either: the
	// passphrase is refused before either is needed.
	err := runCtl(context.Background(), []string{"--dir", dir, "--provider", "https://127.0.0.1:1", "backup", "--passphrase-file", pass, "--out", out},
		strings.NewReader(""), &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), backup.PassphraseRule) {
		t.Fatalf("backup with a weak passphrase: %v, want the rule %q", err, backup.PassphraseRule)
	}
	if _, err := os.Stat(out); err == nil {
		t.Fatal("a refused backup wrote its archive")
	}
}

// runCtl runs `nkpctl provider ARGS` as cmd/nkpctl does.
func runCtl(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	cmd := Command(stdin, stdout, stderr)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	cmd.SetArgs(args)
	return cmd.ExecuteContext(ctx)
}

func TestParseTime(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{"2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z", false},
		{"2026-11-01T02:00:00+02:00", "2026-11-01T00:00:00Z", false},
		{"2026-11-01", "2026-11-01T00:00:00Z", false},
		{"yesterday", "", true},
		{"2026-13-01", "", true},
		{"", "", true},
	}
	for _, tc := range tests {
		got, err := parseTime(tc.in)
		if tc.wantErr {
			if err == nil || !strings.Contains(err.Error(), "--before") {
				t.Fatalf("parseTime(%q) = %v, %v; want an error naming --before", tc.in, got, err)
			}
			continue
		}
		if err != nil || got.UTC().Format(time.RFC3339) != tc.want {
			t.Fatalf("parseTime(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}
