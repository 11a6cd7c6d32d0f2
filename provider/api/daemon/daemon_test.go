package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider"
	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/client"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		cfg     daemon.Config
		wantErr string
	}{
		{"ok", daemon.Config{Dir: "d", Listen: ":0", Log: quiet()}, ""},
		{"no dir", daemon.Config{Listen: ":0", Log: quiet()}, "--dir"},
		{"no listen", daemon.Config{Dir: "d", Log: quiet()}, "--listen"},
		{"etcd without endpoints", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{Kind: "etcd"}}, "--etcd-endpoints"},
		{"endpoints with bolt", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{EtcdEndpoints: []string{"http://x"}}}, "--store etcd"},
		{"unknown store", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{Kind: "redis"}}, "--store"},
		{"https without CA", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{Kind: "etcd", EtcdEndpoints: []string{"https://x:2379"}}}, "--etcd-cacert"},
		{"TLS files with http", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{Kind: "etcd", EtcdEndpoints: []string{"http://x:2379"}, EtcdCACert: "ca.pem"}}, "not https://"},
		{"cert without key", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{Kind: "etcd", EtcdEndpoints: []string{"https://x:2379"}, EtcdCACert: "ca.pem", EtcdCert: "c.pem"}}, "--etcd-key"},
		{"TLS files with bolt", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{EtcdCACert: "ca.pem"}}, "--store etcd"},
		{"etcd TLS ok", daemon.Config{Dir: "d", Listen: ":0", Log: quiet(), Store: daemon.StoreConfig{Kind: "etcd", EtcdEndpoints: []string{"https://x:2379"}, EtcdCACert: "ca.pem", EtcdCert: "c.pem", EtcdKey: "k.pem"}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if (tc.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("Validate() = %v, want error naming %q", err, tc.wantErr)
			}
		})
	}
}

// TestInitServeShutdown runs a provider in-process on bbolt: Init lays out the directory
// with private modes, Start serves the admin API, Shutdown drains and closes the store so
// a second Start can open the same file.
func TestInitServeShutdown(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "p")
	st, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()})
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	if st.State != provider.StateNotBackedUp {
		t.Fatalf("state after init %s", st.State)
	}
	for name, mode := range map[string]os.FileMode{daemon.RootKeyFile: 0o600, daemon.StoreFile: 0o600, daemon.AdminKeyFile: 0o600, daemon.AdminCertFile: 0o600, daemon.CACertFile: 0o644, ".": 0o700} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v, mode %v, want %v", name, err, fi.Mode().Perm(), mode)
		}
	}
	if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err == nil {
		t.Fatal("a second Init in the same directory succeeded")
	}

	for round := 0; round < 2; round++ {
		d, err := daemon.Start(ctx, daemon.Config{Dir: dir, Listen: "127.0.0.1:0", Log: quiet()})
		if err != nil {
			t.Fatalf("Start (round %d): %v", round, err)
		}
		select {
		case <-d.Ready():
		case <-time.After(10 * time.Second):
			t.Fatal("not ready")
		}
		adm, err := daemon.LoadAdmin(dir)
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.New(client.Config{URL: d.URL(), CA: adm.CA, Certificate: adm.Certificate})
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.Status(ctx)
		if err != nil || got.ProviderID != st.ProviderID {
			t.Fatalf("status over HTTPS = %+v, %v", got, err)
		}
		if err := c.Readyz(ctx); err != nil {
			t.Fatalf("readyz: %v", err)
		}
		c.Close()
		if err := d.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		select {
		case <-d.Done():
		default:
			t.Fatal("Done not closed after Shutdown")
		}
	}
}

// TestRestore rebuilds a provider from a backup into an empty directory and refuses to
// restore over it again without force.
func TestRestore(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "p")
	if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err != nil {
		t.Fatal(err)
	}
	d, err := daemon.Start(ctx, daemon.Config{Dir: dir, Listen: "127.0.0.1:0", Log: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	var archive bytes.Buffer
	info, err := d.Provider().Backup(ctx, &archive, []byte("pw: correct horse battery"))
	if err != nil {
		t.Fatal(err)
	}
	d.Shutdown(ctx)

	// A refused restore leaves the directory as it found it (missing, or empty), so init
	// works there afterwards.
	refusals := []struct {
		name    string
		archive []byte
		pass    string
		want    error
	}{
		{"wrong passphrase", archive.Bytes(), "not the passphrase at all", provider.ErrBadPassphrase},
		{"truncated archive", archive.Bytes()[:archive.Len()-20], "pw: correct horse battery", provider.ErrBadArchive},
	}
	for _, tc := range refusals {
		for _, exists := range []bool{false, true} {
			t.Run(fmt.Sprintf("refused: %s, directory existed %v", tc.name, exists), func(t *testing.T) {
				parent := t.TempDir()
				dir := filepath.Join(parent, "new", "p")
				if exists {
					if err := os.MkdirAll(dir, 0o700); err != nil {
						t.Fatal(err)
					}
				}
				_, err := daemon.Restore(ctx, daemon.RestoreConfig{Dir: dir, Archive: bytes.NewReader(tc.archive),
					Passphrase: []byte(tc.pass), Log: quiet()})
				if !errors.Is(err, tc.want) {
					t.Fatalf("Restore = %v, want %v", err, tc.want)
				}
				entries, err := os.ReadDir(parent)
				if !exists {
					if err != nil || len(entries) != 0 {
						t.Fatalf("after the refused restore %s holds %v (%v), want nothing", parent, entries, err)
					}
					return
				}
				if left, err := os.ReadDir(dir); err != nil || len(left) != 0 {
					t.Fatalf("after the refused restore %s holds %v (%v), want it empty as before", dir, left, err)
				}
				if _, err := daemon.Init(ctx, daemon.InitConfig{Dir: dir, Log: quiet()}); err != nil {
					t.Fatalf("init after the refused restore: %v", err)
				}
			})
		}
	}

	dir2 := filepath.Join(t.TempDir(), "q")
	tests := []struct {
		name    string
		pass    string
		force   bool
		wantErr error
	}{
		{"wrong passphrase", "nope", false, provider.ErrBadPassphrase},
		{"into an empty provider", "pw: correct horse battery", false, nil},
		{"over a non-empty provider", "pw: correct horse battery", false, provider.ErrNotEmpty},
		{"forced", "pw: correct horse battery", true, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, err := daemon.Restore(ctx, daemon.RestoreConfig{Dir: dir2, Archive: bytes.NewReader(archive.Bytes()),
				Passphrase: []byte(tc.pass), Force: tc.force, Log: quiet()})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Restore = %v, want %v", err, tc.wantErr)
			}
			if err == nil && st.ProviderID != info.ProviderID {
				t.Fatalf("restored provider %s, want %s", st.ProviderID, info.ProviderID)
			}
		})
	}
	if _, err := daemon.LoadAdmin(dir2); err != nil {
		t.Fatalf("admin credentials after restore: %v", err)
	}
}

// TestRefusedBeforeWriting: Init and Restore check the directory name, the store settings
// and the root key's TPM spec before they create anything.
func TestRefusedBeforeWriting(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name    string
		dir     bool // give a directory (that must not be created)
		tpm     string
		store   daemon.StoreConfig
		wantErr string
	}{
		{"no directory", false, "", daemon.StoreConfig{}, "--dir"},
		{"TPM spec without a path", true, "swtpm:", daemon.StoreConfig{}, "--root-key-tpm"},
		{"TPM spec that is not a device", true, "tpm0", daemon.StoreConfig{}, "--root-key-tpm"},
		{"unknown store", true, "", daemon.StoreConfig{Kind: "mongo"}, "mongo"},
	}
	for _, tc := range tests {
		for _, op := range []string{"init", "restore"} {
			t.Run(tc.name+"/"+op, func(t *testing.T) {
				dir := ""
				if tc.dir {
					dir = filepath.Join(t.TempDir(), "p")
				}
				var err error
				if op == "init" {
					_, err = daemon.Init(ctx, daemon.InitConfig{Dir: dir, Store: tc.store, RootKeyTPM: tc.tpm, Log: quiet()})
				} else {
					_, err = daemon.Restore(ctx, daemon.RestoreConfig{Dir: dir, Store: tc.store, RootKeyTPM: tc.tpm,
						Archive: strings.NewReader("not read"), Passphrase: []byte("pw: correct horse battery"), Log: quiet()})
				}
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("%s: err %v, want one naming %q", op, err, tc.wantErr)
				}
				if dir != "" {
					if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("%s created %s before refusing (stat: %v)", op, dir, err)
					}
				}
			})
		}
	}
}
