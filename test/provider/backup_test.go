package provider_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/e2e"
)

// TestBackupArchives: `backup verify` accepts the archive with the right passphrase and
// refuses a wrong passphrase, a truncated and a tampered archive; the passphrase can come
// from stdin; and the standard `age -d` opens the archive (break-glass) to the JSON document.
func TestBackupArchives(t *testing.T) {
	b := build(t)
	dir, s := b.running(t)
	tmp := t.TempDir()
	archive := filepath.Join(tmp, "b.age")
	b.mustCtl(t, dir, s.url, "s3cret passphrase\n", "backup", "--passphrase-stdin", "--out", archive)
	data, err := os.ReadFile(archive)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(tmp, "truncated.age")
	tampered := filepath.Join(tmp, "tampered.age")
	if err := os.WriteFile(truncated, data[:len(data)-20], 0o600); err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(data)
	bad[len(bad)-40] ^= 0x01
	if err := os.WriteFile(tampered, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	right := writeFile(t, filepath.Join(tmp, "right"), "s3cret passphrase\n")
	wrong := writeFile(t, filepath.Join(tmp, "wrong"), "guess\n")
	tests := []struct {
		name, file, pass string
		wantErr          string // "" = accepted
	}{
		{"good", archive, right, ""},
		{"wrong passphrase", archive, wrong, "passphrase"},
		{"truncated", truncated, right, "archive"},
		{"tampered", tampered, right, "archive"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := b.ctl(t, dir, "", "", "backup", "verify", "--in", tc.file, "--passphrase-file", tc.pass)
			if tc.wantErr == "" {
				if err != nil || !strings.Contains(out, "OK") {
					t.Fatalf("verify = %q, %v", out, err)
				}
				return
			}
			if err == nil || !strings.Contains(strings.ToLower(err.Error()), tc.wantErr) {
				t.Fatalf("verify = %v, want a refusal naming the %s", err, tc.wantErr)
			}
		})
	}
	if _, err := b.ctl(t, t.TempDir(), "", "", "restore", "--in", archive, "--passphrase-file", wrong); err == nil || !strings.Contains(err.Error(), "passphrase") {
		t.Fatalf("restore with the wrong passphrase: %v", err)
	}

	t.Run("age -d through a pty", func(t *testing.T) {
		e2e.Require(t, "age")
		plain := filepath.Join(t.TempDir(), "backup.json")
		cmd := exec.Command("age", "-d", "-o", plain, archive)
		ptmx, err := pty.Start(cmd)
		if err != nil {
			t.Fatalf("age under a pty: %v", err)
		}
		defer ptmx.Close()
		var seen bytes.Buffer
		e2e.WaitFor(t, 30*time.Second, "age's passphrase prompt", func() bool {
			ptmx.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			buf := make([]byte, 256)
			n, _ := ptmx.Read(buf)
			seen.Write(buf[:n])
			return strings.Contains(strings.ToLower(seen.String()), "passphrase")
		})
		if _, err := io.WriteString(ptmx, "s3cret passphrase\r"); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { io.Copy(io.Discard, ptmx); done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("age -d: %v (terminal: %q)", err, seen.String())
			}
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			t.Fatal("age -d did not finish within 60 s")
		}
		doc, err := os.ReadFile(plain)
		if err != nil {
			t.Fatal(err)
		}
		var v struct {
			Format string            `json:"format"`
			KDKs   []json.RawMessage `json:"kdks"`
		}
		if err := json.Unmarshal(doc, &v); err != nil || v.Format != "nkp-provider-backup" || len(v.KDKs) != 1 {
			t.Fatalf("age -d output is not the backup document: %v, %+v", err, v)
		}
	})
}

// TestGracefulShutdownAndNotify: READY=1 reaches NOTIFY_SOCKET once the server listens
// (the harness waits for it), SIGTERM sends STOPPING=1 and ends the process with status 0.
func TestGracefulShutdownAndNotify(t *testing.T) {
	b := build(t)
	dir := b.initProvider(t)
	s := b.serveEnv(t, dir, []string{"WATCHDOG_USEC=200000"})
	for i := 0; i < 2; i++ { // WATCHDOG_USEC=200ms: keep-alives every 100 ms while the store answers
		if got := s.notification(t); got != "WATCHDOG=1" {
			t.Fatalf("notification %q, want WATCHDOG=1", got)
		}
	}
	if status, _ := rawGet(t, s.url+"/healthz", filepath.Join(dir, "ca.crt")); status != 200 {
		t.Fatalf("healthz = %d", status)
	}
	s.stop(t)
	for {
		got := s.notification(t)
		if got == "STOPPING=1" {
			break
		}
		if got != "WATCHDOG=1" {
			t.Fatalf("notification at SIGTERM %q, want STOPPING=1", got)
		}
	}
}

// TestPassphrasePrompt: without --passphrase-file or --passphrase-stdin, nkpctl asks on
// the terminal (twice for a backup) and the archive opens with what was typed.
func TestPassphrasePrompt(t *testing.T) {
	b := build(t)
	dir, s := b.running(t)
	archive := filepath.Join(t.TempDir(), "b.age")
	cmd := exec.Command(b.nkpctl, "provider", "--dir", dir, "--provider", s.url, "backup", "--out", archive)
	ptmx, err := pty.Start(cmd)
	if err != nil {
		t.Fatalf("nkpctl under a pty: %v", err)
	}
	defer ptmx.Close()
	var seen, all bytes.Buffer // since the last prompt; everything the terminal showed
	expect := func(what string) {
		t.Helper()
		e2e.WaitFor(t, 30*time.Second, "the prompt "+what, func() bool {
			ptmx.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			buf := make([]byte, 256)
			n, _ := ptmx.Read(buf)
			seen.Write(buf[:n])
			all.Write(buf[:n])
			return strings.Contains(seen.String(), what)
		})
		seen.Reset()
	}
	// Type only once nkpctl has turned echo off (the prompt is printed just before).
	echoOff := func() bool {
		tio, err := unix.IoctlGetTermios(int(ptmx.Fd()), unix.TCGETS)
		return err == nil && tio.Lflag&unix.ECHO == 0
	}
	expect("Backup passphrase:")
	e2e.WaitFor(t, 30*time.Second, "echo off for the passphrase", echoOff)
	io.WriteString(ptmx, "typed at the prompt\r")
	expect("Again:")
	e2e.WaitFor(t, 30*time.Second, "echo off for the confirmation", echoOff)
	io.WriteString(ptmx, "typed at the prompt\r")
	done := make(chan error, 1)
	var rest bytes.Buffer
	go func() { io.Copy(&rest, ptmx); done <- cmd.Wait() }()
	select {
	case err := <-done:
		all.Write(rest.Bytes())
		if err != nil {
			t.Fatalf("nkpctl backup with a prompt: %v (terminal: %q)", err, all.String())
		}
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatal("nkpctl backup did not finish within 60 s")
	}
	if strings.Contains(all.String(), "typed at the prompt") {
		t.Fatalf("the passphrase was echoed to the terminal: %q", all.String())
	}
	if !strings.Contains(all.String(), "backup written") {
		t.Fatalf("terminal output %q lacks the confirmation", all.String())
	}
	pass := writeFile(t, filepath.Join(t.TempDir(), "p"), "typed at the prompt\n")
	if out, err := b.ctl(t, dir, "", "", "backup", "verify", "--in", archive, "--passphrase-file", pass); err != nil || !strings.Contains(out, "OK") {
		t.Fatalf("verify the prompted backup: %q, %v", out, err)
	}
}

// TestBackupConfirm: a backup counts only once nkpctl has saved the archive, opened it
// again and confirmed its SHA-256. A backup that cannot be saved, or a saved archive that
// does not open, leaves the provider NotBackedUp (status says a backup is unconfirmed);
// `backup confirm --in FILE` confirms a good archive later.
func TestBackupConfirm(t *testing.T) {
	b := build(t)
	ctx := context.Background()
	dir, s := b.running(t)
	h := b.mustJoin(t, s, "kvm-01")
	tmp := t.TempDir()
	pass := writeFile(t, filepath.Join(tmp, "pass"), "pw: correct horse battery\n")

	_, err := b.ctl(t, dir, s.url, "", "backup", "--passphrase-file", pass, "--out", filepath.Join(tmp, "missing-dir", "b.age"))
	if err == nil || !strings.Contains(err.Error(), "not confirmed") {
		t.Fatalf("backup into a missing directory: %v, want a refusal saying it is not confirmed", err)
	}
	var st apiv1.Status
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "NotBackedUp" || st.PendingBackups != 1 || !st.LastBackup.IsZero() {
		t.Fatalf("status after an unsaved backup = %+v, want NotBackedUp with 1 unconfirmed backup", st)
	}
	if out := b.mustCtl(t, dir, s.url, "", "status"); !strings.Contains(out, "unconfirmed backups") {
		t.Fatalf("status does not mention the unconfirmed backup:\n%s", out)
	}
	if _, err := h.c.Release(ctx); !client.IsCode(err, apiv1.CodeNotBackedUp) {
		t.Fatalf("release after an unsaved backup: %v, want %s", err, apiv1.CodeNotBackedUp)
	}

	// An archive fetched but never confirmed (as if nkpctl died after the transfer).
	adm, err := daemon.LoadAdmin(dir)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(client.Config{URL: s.url, CA: adm.CA, Certificate: adm.Certificate})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var buf bytes.Buffer
	if _, err := cl.Backup(ctx, &buf, []byte("pw: correct horse battery")); err != nil {
		t.Fatal(err)
	}
	full := writeFile(t, filepath.Join(tmp, "full.age"), buf.String())
	cut := writeFile(t, filepath.Join(tmp, "cut.age"), buf.String()[:buf.Len()-30])
	if _, err := b.ctl(t, dir, s.url, "", "backup", "confirm", "--in", cut, "--passphrase-file", pass); err == nil || !strings.Contains(err.Error(), "not confirmed") {
		t.Fatalf("confirming a truncated archive: %v, want a refusal", err)
	}
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "NotBackedUp" {
		t.Fatalf("state after a refused confirmation: %s", st.State)
	}
	b.mustCtl(t, dir, s.url, "", "backup", "confirm", "--in", full, "--passphrase-file", pass)
	b.ctlJSON(t, dir, s.url, &st, "status")
	if st.State != "Active" || st.LastBackup.IsZero() {
		t.Fatalf("status after confirming = %+v, want Active", st)
	}
	if _, err := h.c.Release(ctx); err != nil {
		t.Fatalf("release after the confirmed backup: %v", err)
	}
}
