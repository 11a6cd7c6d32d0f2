package provider_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/audit"
	"github.com/nkp-dev/nkp/provider/backup"
	"github.com/nkp-dev/nkp/provider/store"
	"github.com/nkp-dev/nkp/provider/store/mem"
)

func TestBackupRestore(t *testing.T) {
	ctx := context.Background()
	src := initEnv(t, provider.Policy{})
	h := src.enroll(t, "kvm-01", nil)
	revoked := src.enroll(t, "kvm-02", nil)
	if err := src.p.Revoke(ctx, revoked.id); err != nil {
		t.Fatal(err)
	}
	st0, _ := src.p.Status(ctx)
	obj := provider.Object{VMUUID: uuid.NewString(), Name: "vtpm", KeyID: uuid.NewString(), KDKID: st0.KDKs[0].ID}
	if err := src.p.RegisterObject(ctx, h.id, obj); err != nil {
		t.Fatal(err)
	}
	archive := src.backup(t, "correct horse battery")
	want, err := src.p.Release(ctx, h.id)
	if err != nil {
		t.Fatal(err)
	}
	info, err := src.p.VerifyBackup(ctx, bytes.NewReader(archive), []byte("correct horse battery"))
	if err != nil {
		t.Fatal(err)
	}
	if info.ProviderID != st0.ProviderID || info.Hosts != 2 || info.Objects != 1 || info.Primary != 1 || info.Bytes != int64(len(archive)) {
		t.Fatalf("VerifyBackup = %+v", info)
	}
	sum := sha256.Sum256(archive)
	if info.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("VerifyBackup SHA256 %s, want the archive's %x", info.SHA256, sum)
	}
	recs, err := src.p.Audit(ctx, 2) // backup, then the release
	if err != nil || recs[0].Kind != audit.KindBackup || recs[0].Details["archive_sha256"] != info.SHA256 {
		t.Fatalf("the backup audit record does not name the archive's hash: %+v, %v", recs, err)
	}

	// Restore into an empty provider with another root key: hosts and keys keep working.
	dst := newEnv(t)
	st, err := dst.p.Restore(ctx, bytes.NewReader(archive), []byte("correct horse battery"), false)
	if err != nil {
		t.Fatal(err)
	}
	if st.ProviderID != st0.ProviderID || st.State != provider.StateActive || st.Hosts != 1 || st.Revoked != 1 || st.LastBackup.IsZero() {
		t.Fatalf("restored status: %+v", st)
	}
	if dst.caHash(t) != src.caHash(t) {
		t.Fatal("restored CA differs: hosts pinning it would refuse the provider")
	}
	if _, err := dst.p.AuthorizeHost(ctx, h.cert); err != nil {
		t.Fatalf("host certificate on the restored provider: %v", err)
	}
	if _, err := dst.p.AuthorizeHost(ctx, revoked.cert); !errors.Is(err, provider.ErrHostRevoked) {
		t.Fatalf("revoked host on the restored provider: %v", err)
	}
	got, err := dst.p.Release(ctx, h.id)
	if err != nil || len(got) != 1 || !bytes.Equal(got[0].Bare, want[0].Bare) || got[0].ID != want[0].ID {
		t.Fatalf("restored release differs: %v", err)
	}
	objs, err := dst.p.Objects(ctx, provider.ObjectFilter{VMUUID: obj.VMUUID})
	if err != nil || len(objs) != 1 || objs[0].KeyID != obj.KeyID {
		t.Fatalf("restored catalog: %+v, %v", objs, err)
	}
	// The restored store opens with the new root key only.
	reopened := open(t, dst.st, dst.rk, dst.clock)
	if _, err := reopened.p.Release(ctx, h.id); err != nil {
		t.Fatalf("release after reopening the restored store: %v", err)
	}

	// Over a non-empty provider: refused unless forced; forcing keeps the audit log.
	other := initEnv(t, provider.Policy{TPMRequired: true})
	if _, err := other.p.Restore(ctx, bytes.NewReader(archive), []byte("correct horse battery"), false); !errors.Is(err, provider.ErrNotEmpty) {
		t.Fatalf("restore over a provider: %v, want ErrNotEmpty", err)
	}
	if _, err := other.p.Restore(ctx, bytes.NewReader(archive), []byte("correct horse battery"), true); err != nil {
		t.Fatalf("forced restore: %v", err)
	}
	if _, err := other.p.AuthorizeHost(ctx, h.cert); err != nil {
		t.Fatalf("host after forced restore: %v", err)
	}
	if pol, _ := other.p.Policy(ctx); pol.TPMRequired {
		t.Fatal("forced restore kept the replaced provider's policy")
	}
	if err := other.p.AuditVerify(ctx); err != nil {
		t.Fatal(err)
	}
	recs, _ = other.p.Audit(ctx, 1)
	if len(recs) != 1 || recs[0].Kind != audit.KindRestore || recs[0].Details["forced"] != "true" {
		t.Fatalf("last audit record after forced restore: %+v", recs)
	}
	assertNoSecret(t, dst.logs.String(), want[0].Bare)
	assertNoSecret(t, other.logs.String(), want[0].Bare)
}

func TestRestoreRefusesBadArchives(t *testing.T) {
	ctx := context.Background()
	src := initEnv(t, provider.Policy{})
	archive := src.backup(t, "pass: correct horse battery")
	flipped := bytes.Clone(archive)
	flipped[len(flipped)-10] ^= 0x40
	tests := []struct {
		name string
		data []byte
		pass string
		want error
	}{
		{"wrong passphrase", archive, "Pass", provider.ErrBadPassphrase},
		{"truncated", archive[:len(archive)-17], "pass: correct horse battery", provider.ErrBadArchive},
		{"half", archive[:len(archive)/2], "pass: correct horse battery", provider.ErrBadArchive},
		{"tampered", flipped, "pass: correct horse battery", provider.ErrBadArchive},
		{"empty", nil, "pass: correct horse battery", provider.ErrBadArchive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := newEnv(t)
			if _, err := dst.p.VerifyBackup(ctx, bytes.NewReader(tt.data), []byte(tt.pass)); !errors.Is(err, tt.want) {
				t.Fatalf("VerifyBackup: %v, want %v", err, tt.want)
			}
			if _, err := dst.p.Restore(ctx, bytes.NewReader(tt.data), []byte(tt.pass), false); !errors.Is(err, tt.want) {
				t.Fatalf("Restore: %v, want %v", err, tt.want)
			}
			if _, err := dst.p.Status(ctx); !errors.Is(err, provider.ErrNotInitialized) {
				t.Fatalf("a refused restore left state behind: %v", err)
			}
		})
	}
}

func TestBackupRefusals(t *testing.T) {
	ctx := context.Background()
	if _, err := newEnv(t).p.Backup(ctx, &bytes.Buffer{}, []byte("p: correct horse battery")); !errors.Is(err, provider.ErrNotInitialized) {
		t.Fatalf("backup before init: %v", err)
	}
	e := initEnv(t, provider.Policy{})
	if _, err := e.p.Backup(ctx, &bytes.Buffer{}, nil); err == nil {
		t.Fatal("backup with an empty passphrase succeeded")
	}
	if _, err := e.p.Backup(ctx, failWriter{}, []byte("p: correct horse battery")); err == nil {
		t.Fatal("backup to a failing writer succeeded")
	}
	if st, _ := e.p.Status(ctx); st.State != provider.StateNotBackedUp || !st.LastBackup.IsZero() {
		t.Fatalf("a failed backup changed the state: %+v", st)
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestRootKeyMismatch(t *testing.T) {
	e := initEnv(t, provider.Policy{})
	other := newEnv(t) // another root key
	_, err := provider.Open(context.Background(), provider.Config{Store: e.st, RootKey: other.rk, Log: discardLog()})
	if !errors.Is(err, provider.ErrRootKeyMismatch) {
		t.Fatalf("Open with another provider's root key: %v, want ErrRootKeyMismatch", err)
	}
}

func TestStoreFailuresLoseNothing(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	h := e.enroll(t, "kvm-01", nil)
	e.backup(t, "p: correct horse battery")
	ms := e.st.(*mem.Store)
	before, _ := e.p.Status(ctx)

	ms.SetReadOnly(true)
	if _, err := e.p.Rotate(ctx); !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("Rotate on a read-only store: %v, want ErrReadOnly", err)
	}
	// A release that cannot be audited does not happen.
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, store.ErrReadOnly) {
		t.Fatalf("Release on a read-only store: %v, want ErrReadOnly", err)
	}
	ms.SetReadOnly(false)

	ms.SetQuota(1)
	if _, err := e.p.CreateToken(ctx, 0); !errors.Is(err, store.ErrFull) {
		t.Fatalf("CreateToken on a full store: %v, want ErrFull", err)
	}
	if err := e.p.Revoke(ctx, h.id); !errors.Is(err, store.ErrFull) {
		t.Fatalf("Revoke on a full store: %v, want ErrFull", err)
	}
	ms.SetQuota(0)

	after, _ := e.p.Status(ctx)
	if len(after.KDKs) != len(before.KDKs) || after.Hosts != 1 || after.State != provider.StateActive {
		t.Fatalf("a failed write changed the provider: before %+v after %+v", before, after)
	}
	if err := e.p.AuditVerify(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Release(ctx, h.id); err != nil {
		t.Fatalf("release once the store is writable again: %v", err)
	}
}

func TestAuditVerifyDetectsTampering(t *testing.T) {
	tests := []struct {
		name   string
		tamper func(tx store.Tx) error
	}{
		{"removed record", func(tx store.Tx) error { return tx.Delete(audit.Bucket, "00000000000000000002") }},
		{"changed record", func(tx store.Tx) error {
			v, err := tx.Get(audit.Bucket, "00000000000000000003")
			if err != nil {
				return err
			}
			return tx.Put(audit.Bucket, "00000000000000000003", bytes.Replace(v, []byte(`"kvm-01"`), []byte(`"kvm-99"`), 1))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			e := initEnv(t, provider.Policy{})
			e.enroll(t, "kvm-01", nil) // records: 1 init, 2 token, 3 enroll
			if err := e.p.AuditVerify(ctx); err != nil {
				t.Fatal(err)
			}
			if err := e.st.Update(ctx, tt.tamper); err != nil {
				t.Fatal(err)
			}
			if err := e.p.AuditVerify(ctx); !errors.Is(err, audit.ErrTampered) {
				t.Fatalf("AuditVerify: %v, want ErrTampered", err)
			}
		})
	}
}

// rotatingWriter rotates the provider's KDK while the backup archive is being written.
type rotatingWriter struct {
	bytes.Buffer
	rotate  func() error
	rotated bool
	err     error
}

func (w *rotatingWriter) Write(p []byte) (int, error) {
	if !w.rotated {
		w.rotated = true
		w.err = w.rotate()
	}
	return w.Buffer.Write(p)
}

// TestBackupDuringRotate: a version made while a backup is being written is not in that
// archive, so the backup must not mark it backed up.
func TestBackupDuringRotate(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	w := &rotatingWriter{rotate: func() error { _, err := e.p.Rotate(ctx); return err }}
	info, err := e.p.Backup(ctx, w, []byte("p: correct horse battery"))
	if err != nil || w.err != nil {
		t.Fatalf("Backup: %v; Rotate during it: %v", err, w.err)
	}
	if len(info.KDKs) != 1 || info.KDKs[0] != 1 {
		t.Fatalf("archive holds versions %v, want [1]", info.KDKs)
	}
	if _, err := e.p.ConfirmBackup(ctx, info.SHA256); err != nil {
		t.Fatalf("ConfirmBackup: %v", err)
	}
	st, _ := e.p.Status(ctx)
	if st.State != provider.StateNotBackedUp || !st.KDKs[0].BackedUp || st.KDKs[1].BackedUp {
		t.Fatalf("after a backup that missed version 2: %+v", st)
	}
	e.backup(t, "p: correct horse battery")
	if st, _ := e.p.Status(ctx); st.State != provider.StateActive {
		t.Fatalf("after the next backup: %s, want Active", st.State)
	}
}

// TestBackupConfirm: a written backup changes nothing until it is confirmed by the
// archive's SHA-256; wrong, malformed and expired sums are refused; a repeated
// confirmation answers the same; both steps are in the audit log.
func TestBackupConfirm(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 11, 28, 9, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	e := initEnv(t, provider.Policy{}, func(c *provider.Config) { c.Now = func() time.Time { return clock() } })
	h := e.enroll(t, "kvm-01", nil)
	var buf bytes.Buffer
	info, err := e.p.Backup(ctx, &buf, []byte("p: correct horse battery"))
	if err != nil {
		t.Fatalf("Backup: %v", err)
	}
	sum := sha256.Sum256(buf.Bytes())
	if info.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("BackupInfo.SHA256 %s is not the archive's %x", info.SHA256, sum)
	}
	st, _ := e.p.Status(ctx)
	if st.State != provider.StateNotBackedUp || !st.LastBackup.IsZero() || st.PendingBackups != 1 {
		t.Fatalf("after an unconfirmed backup: state %s, last backup %v, pending %d; want NotBackedUp, never, 1", st.State, st.LastBackup, st.PendingBackups)
	}
	if _, err := e.p.Release(ctx, h.id); !errors.Is(err, provider.ErrNotBackedUp) || !strings.Contains(err.Error(), "confirm") {
		t.Fatalf("release after an unconfirmed backup: %v, want ErrNotBackedUp saying it needs confirming", err)
	}
	other := sha256.Sum256([]byte("another archive"))
	for _, tc := range []struct {
		name, sum string
		want      error
	}{
		{"not hex", "zz", provider.ErrBadRequest},
		{"short", info.SHA256[:62], provider.ErrBadRequest},
		{"unknown archive", hex.EncodeToString(other[:]), provider.ErrNotFound},
	} {
		if _, err := e.p.ConfirmBackup(ctx, tc.sum); !errors.Is(err, tc.want) {
			t.Fatalf("%s: ConfirmBackup(%q) = %v, want %v", tc.name, tc.sum, err, tc.want)
		}
	}
	if st, _ := e.p.Status(ctx); st.State != provider.StateNotBackedUp {
		t.Fatalf("refused confirmations changed the state to %s", st.State)
	}
	for i := 0; i < 2; i++ {
		got, err := e.p.ConfirmBackup(ctx, strings.ToUpper(info.SHA256))
		if err != nil || got.SHA256 != info.SHA256 || len(got.KDKs) != 1 {
			t.Fatalf("ConfirmBackup #%d = %+v, %v; want the backup's info", i+1, got, err)
		}
	}
	st, _ = e.p.Status(ctx)
	if st.State != provider.StateActive || !st.LastBackup.Equal(info.Created) || st.PendingBackups != 0 {
		t.Fatalf("after confirming: %+v", st)
	}
	if _, err := e.p.Release(ctx, h.id); err != nil {
		t.Fatalf("release after a confirmed backup: %v", err)
	}
	recs, err := e.p.Audit(ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	var stages []string
	for _, r := range recs {
		if r.Kind == audit.KindBackup {
			stages = append(stages, r.Details["stage"])
		}
	}
	if strings.Join(stages, ",") != "written,confirmed" {
		t.Fatalf("backup audit records have stages %v, want written,confirmed", stages)
	}

	// A backup after a rotation, confirmed after PendingBackupTTL, is refused.
	if _, err := e.p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	late, err := e.p.Backup(ctx, io.Discard, []byte("p: correct horse battery"))
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(provider.PendingBackupTTL + time.Minute)
	if _, err := e.p.ConfirmBackup(ctx, late.SHA256); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("confirming an expired backup: %v, want ErrNotFound", err)
	}
	if st, _ := e.p.Status(ctx); st.State != provider.StateNotBackedUp || st.PendingBackups != 0 {
		t.Fatalf("after an expired backup: state %s, pending %d", st.State, st.PendingBackups)
	}
}

// TestRestoreDropsTokens: an unused join token handed out before the backup is not
// honoured by the restored provider (docs/provider.md says why); a new one works.
func TestRestoreDropsTokens(t *testing.T) {
	ctx := context.Background()
	src := initEnv(t, provider.Policy{})
	tok, err := src.p.CreateToken(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	archive := src.backup(t, "pw: correct horse battery")
	dst := newEnv(t)
	if _, err := dst.p.Restore(ctx, bytes.NewReader(archive), []byte("pw: correct horse battery"), false); err != nil {
		t.Fatal(err)
	}
	h := newHost(t)
	_, err = dst.p.Enroll(ctx, provider.EnrollRequest{Token: tok.Secret, CSR: h.csr, Hostname: "kvm-late"})
	if !errors.Is(err, provider.ErrTokenInvalid) || !strings.Contains(err.Error(), "no token of this provider has this ID and secret") {
		t.Fatalf("pre-backup token after restore: %v, want ErrTokenInvalid", err)
	}
	dst.enroll(t, "kvm-late", nil) // with a token of the restored provider
}

// TestBackupRefusesWeakPassphrase: a passphrase that breaks the rule is refused with
// ErrBadRequest and the rule, before anything is written or recorded.
func TestBackupRefusesWeakPassphrase(t *testing.T) {
	ctx := context.Background()
	e := initEnv(t, provider.Policy{})
	for _, pass := range []string{"x", "hunter2", "aaaaaaaaaaaaaaaaaaaaaaaa"} {
		var buf bytes.Buffer
		_, err := e.p.Backup(ctx, &buf, []byte(pass))
		if !errors.Is(err, provider.ErrBadRequest) || !errors.Is(err, backup.ErrWeakPassphrase) || !strings.Contains(err.Error(), backup.PassphraseRule) {
			t.Fatalf("Backup with %q: %v, want ErrBadRequest stating the rule", pass, err)
		}
		if buf.Len() != 0 {
			t.Fatalf("Backup with %q wrote %d bytes", pass, buf.Len())
		}
	}
	if st, err := e.p.Status(ctx); err != nil || st.PendingBackups != 0 {
		t.Fatalf("status after refused backups: %+v, %v; want no pending backup", st, err)
	}
}
