package cli

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/internal/tpmdev"
	"github.com/nkp-dev/nkp/provider/api/daemon"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/backup"
	"github.com/nkp-dev/nkp/provider/client"
)

// ctl holds the global flags and the streams of one invocation.
type ctl struct {
	stdin          io.Reader
	stdout, stderr io.Writer

	url      string
	dir      string
	certFile string
	keyFile  string
	caFile   string
	asJSON   bool
	pass     passphraseSource
	store    daemon.StoreConfig
	etcdEP   string
	tpm      string // --root-key-tpm (init, restore)
}

// Command returns `nkpctl provider`: init and restore act on a provider directory
// directly; every other subcommand talks to a running nkp-provider over mTLS with the
// admin certificate that init wrote into that directory. Passphrases are never taken from
// the command line: --passphrase-file FILE, --passphrase-stdin, or a terminal prompt.
func Command(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	c := &ctl{stdin: stdin, stdout: stdout, stderr: stderr}
	prov := &cobra.Command{Use: "provider", Short: "run and administer the key provider"}
	pf := prov.PersistentFlags()
	pf.StringVar(&c.url, "provider", envOr("NKP_PROVIDER", "https://127.0.0.1:8443"), "provider URL, or several replicas' URLs comma-separated (env NKP_PROVIDER)")
	pf.StringVar(&c.dir, "dir", envOr("NKP_PROVIDER_DIR", "/var/lib/nkp-provider"), "provider directory with ca.crt, admin.crt, admin.key (env NKP_PROVIDER_DIR)")
	pf.StringVar(&c.certFile, "cert", "", "admin certificate (default DIR/admin.crt)")
	pf.StringVar(&c.keyFile, "key", "", "admin key (default DIR/admin.key)")
	pf.StringVar(&c.caFile, "ca", "", "provider CA certificate (default DIR/ca.crt)")
	pf.BoolVar(&c.asJSON, "json", false, "print JSON")
	prov.AddCommand(c.initCmd(), c.statusCmd(), c.backupCmd(), c.restoreCmd(), c.tokenCmd(), c.hostsCmd(),
		c.revokeCmd(), c.rotateCmd(), c.retireCmd(), c.objectsCmd(), c.auditCmd(), c.policyCmd(), c.adminsCmd())
	return prov
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func (c *ctl) passFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&c.pass.file, "passphrase-file", "", "read the backup passphrase from the first line of FILE")
	cmd.Flags().BoolVar(&c.pass.stdin, "passphrase-stdin", false, "read the backup passphrase from the first line of standard input")
}

func (c *ctl) storeFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&c.store.Kind, "store", daemon.StoreBolt, "store: bolt (a file in --dir) or etcd")
	cmd.Flags().StringVar(&c.etcdEP, "etcd-endpoints", "", "etcd client URLs, comma-separated (--store etcd)")
	cmd.Flags().StringVar(&c.store.EtcdPrefix, "etcd-prefix", "", "key prefix in etcd (default /nkp/provider/)")
	cmd.Flags().StringVar(&c.tpm, "root-key-tpm", "", "the root key is (to be) sealed to this TPM: "+tpmdev.SpecHelp)
	cmd.Flags().StringVar(&c.store.EtcdCACert, "etcd-cacert", "", "CA certificate (PEM) of etcd's server certificate, for https:// endpoints")
	cmd.Flags().StringVar(&c.store.EtcdCert, "etcd-cert", "", "client certificate (PEM) for etcd's --client-cert-auth")
	cmd.Flags().StringVar(&c.store.EtcdKey, "etcd-key", "", "key (PEM, mode 0600) of --etcd-cert")
}

func (c *ctl) storeConfig() daemon.StoreConfig {
	sc := c.store
	if c.etcdEP != "" {
		sc.EtcdEndpoints = strings.Split(c.etcdEP, ",")
	}
	return sc
}

func (c *ctl) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// pick is the file a --cert/--key/--ca flag names, or name in --dir.
func (c *ctl) pick(flag, name string) string {
	if flag != "" {
		return flag
	}
	return filepath.Join(c.dir, name)
}

// client connects with the admin credentials.
func (c *ctl) client() (*client.Client, error) {
	adm, err := daemon.LoadAdminFiles(c.pick(c.certFile, daemon.AdminCertFile), c.pick(c.keyFile, daemon.AdminKeyFile), c.pick(c.caFile, daemon.CACertFile))
	if err != nil {
		return nil, err
	}
	urls := strings.Split(c.url, ",")
	return client.New(client.Config{URL: urls[0], Replicas: urls[1:], CA: adm.CA, Certificate: adm.Certificate})
}

// print writes v as JSON (--json) or through the human formatter.
func (c *ctl) print(v any, human func(w io.Writer)) error {
	if c.asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	human(tw)
	return tw.Flush()
}

// call connects with the admin credentials, runs f with the command's context and the
// client, and closes the client afterwards.
func (c *ctl) call(cmd *cobra.Command, f func(ctx context.Context, cl *client.Client) error) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	defer cl.Close()
	return f(cmd.Context(), cl)
}

// show connects, gets one value and prints it: JSON with --json, else through human.
// get has the shape of a method expression such as (*client.Client).Status.
func show[T any](c *ctl, cmd *cobra.Command, get func(*client.Client, context.Context) (T, error), human func(w io.Writer, v T)) error {
	return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
		v, err := get(cl, ctx)
		if err != nil {
			return err
		}
		return c.print(v, func(w io.Writer) { human(w, v) })
	})
}

func (c *ctl) initCmd() *cobra.Command {
	var tpmRequired bool
	cmd := &cobra.Command{
		Use:   "init",
		Short: "create a provider in --dir: root key, store, CA, first KDK, admin credentials",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := daemon.Init(cmd.Context(), daemon.InitConfig{Dir: c.dir, Store: c.storeConfig(), TPMRequired: tpmRequired, RootKeyTPM: c.tpm, Log: c.logger()})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.stderr, "provider %s initialised in %s; state %s: take a backup (nkpctl provider backup) before hosts can get keys\n", st.ProviderID, c.dir, st.State)
			return nil
		},
	}
	c.storeFlags(cmd)
	cmd.Flags().BoolVar(&tpmRequired, "tpm-required", false, "refuse hosts without a TPM")
	return cmd
}

func (c *ctl) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "show state, KDK versions, hosts, last backup",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, (*client.Client).Status, func(w io.Writer, st apiv1.Status) {
				fmt.Fprintf(w, "provider\t%s\nstate\t%s\nCA hash\t%s\nhosts\t%d\ntpm-required\t%v\n", st.ProviderID, st.State, st.CAHash, st.Hosts, st.TPMRequired)
				if st.LastBackup.IsZero() {
					fmt.Fprintf(w, "last backup\tnever\n")
				} else {
					fmt.Fprintf(w, "last backup\t%s\n", st.LastBackup.Format(time.RFC3339))
				}
				if st.PendingBackups > 0 {
					fmt.Fprintf(w, "unconfirmed backups\t%d (they do not count: confirm with `nkpctl provider backup confirm --in FILE`, or take a backup again)\n", st.PendingBackups)
				}
				for _, k := range st.KDKs {
					fmt.Fprintf(w, "KDK v%d\t%s%s%s\n", k.Version, k.ID, mark(k.Primary, " primary"), mark(k.Retired, " retired"))
				}
			})
		},
	}
}

func mark(b bool, s string) string {
	if b {
		return s
	}
	return ""
}

func (c *ctl) backupCmd() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "backup",
		Short: "write an age-encrypted backup archive, open it again and confirm it (then the provider may release keys)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out FILE is required (the archive is written 0600)")
			}
			pass, err := c.pass.read(c.stdin, c.stderr, true)
			if err != nil {
				return err
			}
			defer clear(pass)
			if err := backup.CheckPassphrase(pass); err != nil {
				return fmt.Errorf("backup: %w; nothing was written", err)
			}
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				var buf bytes.Buffer
				if _, err := cl.Backup(ctx, &buf, pass); err != nil {
					return err
				}
				defer clear(buf.Bytes())
				if err := atomicfile.WriteFile(out, buf.Bytes(), 0o600); err != nil {
					return fmt.Errorf("the backup could not be saved, so it is not confirmed (the provider's state is unchanged): %w (take it again)", err)
				}
				return c.confirm(ctx, cl, out, pass)
			})
		},
	}
	cmd.Flags().StringVarP(&out, "out", "o", "", "archive file to write")
	c.passFlags(cmd)
	cmd.AddCommand(c.backupVerifyCmd(), c.backupConfirmCmd())
	return cmd
}

// confirm opens the stored archive at path again with the passphrase and, if it reads
// back whole, posts its SHA-256 to the provider: only then does the backup count.
func (c *ctl) confirm(ctx context.Context, cl *client.Client, path string, pass []byte) error {
	sum, info, n, err := openArchive(path, pass)
	if err != nil {
		return fmt.Errorf("backup %s does not open again, so it is not confirmed (the provider stays as it was): %w (take it again)", path, err)
	}
	got, err := cl.ConfirmBackup(ctx, sum)
	if err != nil {
		return fmt.Errorf("backup %s (sha256 %s) is saved but NOT confirmed, so the provider still counts it as no backup: %w (retry with `nkpctl provider backup confirm --in %s`)", path, sum, err, path)
	}
	fmt.Fprintf(c.stderr, "backup written to %s (%d bytes, sha256 %s), opened again and confirmed: KDK versions %v are backed up; it opens with `age -d %s` too\n",
		path, n, got.SHA256, info.KDKVersions, path)
	return nil
}

// openArchive reads the archive at path completely with the passphrase and returns the
// hex SHA-256 of its bytes.
func openArchive(path string, pass []byte) (string, backup.Info, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", backup.Info{}, 0, err
	}
	defer f.Close()
	h := sha256.New()
	tee := io.TeeReader(f, h)
	doc, _, err := backup.Read(tee, pass)
	if err != nil {
		return "", backup.Info{}, 0, err
	}
	info := doc.Info()
	doc.Wipe()
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return "", backup.Info{}, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		return "", backup.Info{}, 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), info, fi.Size(), nil
}

func (c *ctl) backupConfirmCmd() *cobra.Command {
	var in string
	cmd := &cobra.Command{
		Use:   "confirm",
		Short: "confirm a saved backup archive to the provider (when `backup` could not)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if in == "" {
				return errors.New("--in FILE is required")
			}
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				pass, err := c.pass.read(c.stdin, c.stderr, false)
				if err != nil {
					return err
				}
				defer clear(pass)
				return c.confirm(ctx, cl, in, pass)
			})
		},
	}
	cmd.Flags().StringVarP(&in, "in", "i", "", "archive file written by `nkpctl provider backup`")
	c.passFlags(cmd)
	return cmd
}

func (c *ctl) backupVerifyCmd() *cobra.Command {
	var in string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "open an archive locally and check it (no provider needed)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, pass, err := c.openArchiveFile("backup verify", in)
			if err != nil {
				return err
			}
			defer f.Close()
			defer clear(pass)
			doc, n, err := backup.Read(f, pass)
			if err != nil {
				return fmt.Errorf("backup %s: %w", in, err)
			}
			defer doc.Wipe()
			info := doc.Info()
			out := apiv1.BackupInfo{ProviderID: info.ProviderID, Created: info.Created, KDKVersions: len(info.KDKVersions), Hosts: info.Hosts, Objects: info.Objects}
			return c.print(out, func(w io.Writer) {
				fmt.Fprintf(w, "archive\t%s (%d bytes): OK\nprovider\t%s\ncreated\t%s\nKDK versions\t%v (primary v%d)\nhosts\t%d\nobjects\t%d\n",
					in, n, info.ProviderID, info.Created.Format(time.RFC3339), info.KDKVersions, info.Primary, info.Hosts, info.Objects)
			})
		},
	}
	cmd.Flags().StringVarP(&in, "in", "i", "", "archive file to check")
	c.passFlags(cmd)
	return cmd
}

// openArchiveFile opens the archive named by --in and reads the passphrase for it.
func (c *ctl) openArchiveFile(op, in string) (*os.File, []byte, error) {
	if in == "" {
		return nil, nil, errors.New("--in FILE is required")
	}
	f, err := os.Open(in)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	pass, err := c.pass.read(c.stdin, c.stderr, false)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, pass, nil
}

func (c *ctl) restoreCmd() *cobra.Command {
	var in string
	var force bool
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "rebuild a provider in --dir from a backup archive (with nkp-provider stopped)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, pass, err := c.openArchiveFile("restore", in)
			if err != nil {
				return err
			}
			defer f.Close()
			defer clear(pass)
			st, err := daemon.Restore(cmd.Context(), daemon.RestoreConfig{Dir: c.dir, Store: c.storeConfig(), Archive: f,
				Passphrase: pass, Force: force, RootKeyTPM: c.tpm, Log: c.logger()})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.stderr, "provider %s restored into %s; state %s, %d hosts\n", st.ProviderID, c.dir, st.State, st.Hosts)
			return nil
		},
	}
	cmd.Flags().StringVarP(&in, "in", "i", "", "archive file to restore")
	cmd.Flags().BoolVar(&force, "force", false, "restore over a provider that is not empty (its state is replaced)")
	c.passFlags(cmd)
	c.storeFlags(cmd)
	return cmd
}

func (c *ctl) tokenCmd() *cobra.Command {
	tok := &cobra.Command{Use: "token", Short: "join tokens"}
	var ttl time.Duration
	create := &cobra.Command{
		Use:   "create",
		Short: "create a single-use join token for one host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			createToken := func(cl *client.Client, ctx context.Context) (apiv1.Token, error) { return cl.CreateToken(ctx, ttl) }
			return show(c, cmd, createToken, func(w io.Writer, t apiv1.Token) {
				// The secret goes to the host through a 0600 file or stdin, never its argv.
				fmt.Fprintf(w, "token\t%s\nexpires\t%s\nCA hash\t%s\n\non the host (token on stdin, not in argv):\tnkp-hostd join --provider %s --ca-hash %s --token-file -\n",
					t.Secret, t.Expires.Format(time.RFC3339), t.CAHash, c.url, t.CAHash)
			})
		},
	}
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the token stays valid")
	tok.AddCommand(create)
	return tok
}

func (c *ctl) hostsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "hosts",
		Short: "list enrolled hosts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, (*client.Client).Hosts, func(w io.Writer, hs []apiv1.Host) {
				fmt.Fprintln(w, "ID\tHOSTNAME\tTPM\tENROLLED\tCERT EXPIRES\tREVOKED")
				for _, h := range hs {
					fmt.Fprintf(w, "%s\t%s\t%v\t%s\t%s\t%v\n", h.ID, h.Hostname, h.TPM, h.Enrolled.Format(time.RFC3339),
						h.CertNotAfter.UTC().Format(time.DateOnly), h.Revoked)
				}
			})
		},
	}
}

func (c *ctl) revokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke HOST-ID",
		Short: "refuse a host from now on, on every replica",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				if err := cl.Revoke(ctx, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(c.stderr, "host %s revoked\n", args[0])
				return nil
			})
		},
	}
}

func (c *ctl) rotateCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rotate",
		Short: "make a new KDK version primary (take a backup afterwards)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, (*client.Client).Rotate, func(w io.Writer, v apiv1.KDKVersion) {
				fmt.Fprintf(w, "KDK v%d\t%s is now primary; take a backup before hosts can get it\n", v.Version, v.ID)
			})
		},
	}
}

func (c *ctl) retireCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "retire VERSION",
		Short: "retire a KDK version no catalogued object uses",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := strconv.Atoi(strings.TrimPrefix(args[0], "v"))
			if err != nil {
				return fmt.Errorf("VERSION %q: want a number like 1 or v1", args[0])
			}
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				if err := cl.Retire(ctx, v); err != nil {
					return err
				}
				fmt.Fprintf(c.stderr, "KDK v%d retired\n", v)
				return nil
			})
		},
	}
}

func (c *ctl) objectsCmd() *cobra.Command {
	var vm string
	var kdkVersion int
	cmd := &cobra.Command{
		Use:   "objects",
		Short: "list the key catalog (by VM, by KDK version)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			objects := func(cl *client.Client, ctx context.Context) ([]apiv1.Object, error) {
				return cl.Objects(ctx, vm, kdkVersion)
			}
			return show(c, cmd, objects, func(w io.Writer, objs []apiv1.Object) {
				fmt.Fprintln(w, "VM\tOBJECT\tKEY ID\tKDK\tHOST")
				for _, o := range objs {
					fmt.Fprintf(w, "%s\t%s\t%s\tv%d %s\t%s\n", o.VMUUID, o.Name, o.KeyID, o.KDKVersion, o.KDKID, o.HostID)
				}
			})
		},
	}
	cmd.Flags().StringVar(&vm, "vm", "", "only this VM UUID")
	cmd.Flags().IntVar(&kdkVersion, "kdk-version", 0, "only objects keyed from this KDK version")
	cmd.AddCommand(c.forgetCmd())
	return cmd
}

// forgetCmd is `nkpctl provider objects forget --vm UUID [--name N] --yes`: the way out
// for the VMs of a host that is gone (decommissioned or lost, and revoked), whose
// objects would otherwise keep their KDK versions from being retired. Without --yes it
// lists what it would remove and changes nothing.
func (c *ctl) forgetCmd() *cobra.Command {
	var vm, name string
	var yes bool
	cmd := &cobra.Command{
		Use:   "forget --vm UUID [--name vtpm|disk:TARGET] --yes",
		Short: "remove a VM's catalog objects registered by a revoked (gone) host, so they stop keeping their KDK version from being retired",
		Long: "Removes VM UUID's catalog objects (or only --name) whose host is revoked or no longer enrolled: the VMs of a " +
			"decommissioned or lost host. A live host's objects are refused: run `nkpctl vm forget` on that host, or revoke it first " +
			"(`nkpctl provider revoke HOST-ID`) if it is gone. Once removed, the objects' KDK version may be retired and their keys " +
			"destroyed: a copy of that VM (its vTPM state, its disks) anywhere else could then no longer be opened. Without --yes, " +
			"lists what would be removed and changes nothing. Audited as forget.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if vm == "" {
				return errors.New("objects forget needs --vm UUID, the VM whose objects to remove (nkpctl provider objects lists them)")
			}
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				if !yes {
					objs, err := cl.Objects(ctx, vm, 0)
					if err != nil {
						return err
					}
					var match []apiv1.Object
					for _, o := range objs {
						if name == "" || o.Name == name {
							match = append(match, o)
						}
					}
					if len(match) == 0 {
						what := "objects"
						if name != "" {
							what = "object " + name
						}
						return fmt.Errorf("the catalog has no %s of VM %s: nothing to forget (nkpctl provider objects lists them)", what, vm)
					}
					fmt.Fprintf(c.stderr, "would remove %d catalog object(s); a KDK version they use may be retired afterwards, after which this VM's keys are gone for good:\n", len(match))
					for _, o := range match {
						fmt.Fprintf(c.stderr, "  %s %s key %s KDK v%d host %s\n", o.VMUUID, o.Name, o.KeyID, o.KDKVersion, o.HostID)
					}
					return fmt.Errorf("objects forget changes nothing without --yes: check that VM %s runs nowhere any more (nkpctl vm status on the hosts it could have migrated to), then run it again with --yes", vm)
				}
				objs, err := cl.ForgetObjects(ctx, vm, name)
				if err != nil {
					return err
				}
				return c.print(objs, func(w io.Writer) { // --json: the list, as objects --json prints it
					fmt.Fprintln(w, "REMOVED\tOBJECT\tKEY ID\tKDK\tHOST")
					for _, o := range objs {
						fmt.Fprintf(w, "%s\t%s\t%s\tv%d %s\t%s\n", o.VMUUID, o.Name, o.KeyID, o.KDKVersion, o.KDKID, o.HostID)
					}
				})
			})
		},
	}
	cmd.Flags().StringVar(&vm, "vm", "", "the VM's UUID")
	cmd.Flags().StringVar(&name, "name", "", "only this object (vtpm, disk:vda, ...)")
	cmd.Flags().BoolVar(&yes, "yes", false, "remove them (the VM's keys become unrecoverable once their KDK version is retired)")
	return cmd
}

func (c *ctl) auditCmd() *cobra.Command {
	var n int
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "show the last audit records",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			audit := func(cl *client.Client, ctx context.Context) ([]apiv1.AuditRecord, error) { return cl.Audit(ctx, n) }
			return show(c, cmd, audit, func(w io.Writer, recs []apiv1.AuditRecord) {
				for _, r := range recs {
					fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%v\n", r.Seq, r.Time.Format(time.RFC3339), r.Kind, r.Actor, r.Subject, r.Details)
				}
			})
		},
	}
	cmd.Flags().IntVarP(&n, "n", "n", 50, "how many records (0: all)")
	cmd.AddCommand(&cobra.Command{
		Use:   "verify",
		Short: "check the audit log's hash chain",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return c.call(cmd, func(ctx context.Context, cl *client.Client) error {
				if err := cl.AuditVerify(ctx); err != nil {
					return err
				}
				fmt.Fprintln(c.stdout, "audit log: chain intact")
				return nil
			})
		},
	}, c.auditPruneCmd())
	return cmd
}

func (c *ctl) policyCmd() *cobra.Command {
	pol := &cobra.Command{
		Use:   "policy",
		Short: "show the provider policy",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, (*client.Client).Policy, policyTable)
		},
	}
	pol.AddCommand(&cobra.Command{
		Use:   "set tpm-required=on|off",
		Short: "change the provider policy",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := parsePolicy(args[0])
			if err != nil {
				return err
			}
			setPolicy := func(cl *client.Client, ctx context.Context) (apiv1.Policy, error) { return cl.SetPolicy(ctx, p) }
			return show(c, cmd, setPolicy, policyTable)
		},
	})
	return pol
}

// policyTable is the human form of a policy.
func policyTable(w io.Writer, p apiv1.Policy) {
	fmt.Fprintf(w, "tpm-required\t%s\n", onOff(p.TPMRequired))
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func parsePolicy(s string) (apiv1.Policy, error) {
	name, val, ok := strings.Cut(s, "=")
	if !ok || name != "tpm-required" {
		return apiv1.Policy{}, fmt.Errorf("policy %q: want tpm-required=on or tpm-required=off", s)
	}
	switch val {
	case "on", "true", "yes":
		return apiv1.Policy{TPMRequired: true}, nil
	case "off", "false", "no":
		return apiv1.Policy{TPMRequired: false}, nil
	}
	return apiv1.Policy{}, fmt.Errorf("policy tpm-required=%q: want on or off", val)
}
