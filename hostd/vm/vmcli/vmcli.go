// Package vmcli is `nkpctl vm`: protect, status, rekey, unprotect and forget, each a thin call
// to hostd's local API over its unix socket (hostd/vm/vmapi). The sentences of refusals
// come from hostd, which names the VM, the key and what to do.
//
// Importers: cmd/nkpctl.
//
// Usage, each with [--socket PATH] (environment NKP_HOSTD_SOCKET, default
// /run/nkp/hostd.sock):
//
//	nkpctl vm protect DOMAIN [--disks all|none|vda,vdb] [--remove-original] [--allow-double-encryption] [--json]
//	nkpctl vm protect --finalize DOMAIN [--json]
//	nkpctl vm status [DOMAIN] [--json]
//	nkpctl vm rekey DOMAIN [--deep] [--json]
//	nkpctl vm unprotect DOMAIN [--tpm keep|none] [--json]
//	nkpctl vm forget UUID|NAME [--local-only] [--yes] [--json]
//
// hostd's sentences are printed as they are. protect, rekey and unprotect ask hostd to
// stream each disk's progress (NDJSON) and draw it on standard error: a progress bar per
// disk (github.com/schollz/progressbar/v3) when standard error is a terminal, else one
// plain line per phase and per 10%. --json prints the final VM object on standard output,
// or on failure the error as {"error": SENTENCE, "code": CODE} (and exits 1).
//
// forget is for a VM libvirt no longer defines on this host and that is gone for good
// (hostd refuses a defined domain): it removes the VM's objects from the provider's
// catalog (those this host owns), its vTPM state, the original disk files kept for it
// and its journal entries. The vTPM state holds the TPM's secrets, so it asks first: on a
// terminal it shows what hostd keeps of the VM and wants "yes" typed; otherwise (or with
// --json) it needs --yes. NAME is the name the VM had: hostd records it at protect, at
// each start and at status. With --local-only hostd does not ask the provider (a host
// it revoked, or one that can no longer reach it): only this host's side goes, and the
// answer lists the objects the catalog keeps and the administrator's command that
// removes them (nkpctl provider objects forget --vm UUID --yes).
package vmcli

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
)

type cli struct {
	stdout, stderr io.Writer
	tty            bool // stderr is a terminal: progress bars
	socket         string
	asJSON         bool
	tpm            string
	protect        vmapi.ProtectRequest
	finalize       bool
	deep           bool
	yes            bool
	localOnly      bool
	stdin          io.Reader // forget's confirmation; nil: none can be asked
}

// Command returns `nkpctl vm`; progress goes to the process's standard error.
func Command(stdout io.Writer) *cobra.Command {
	return newCommand(stdout, os.Stderr, term.IsTerminal(int(os.Stderr.Fd())))
}

func newCommand(stdout, stderr io.Writer, tty bool) *cobra.Command {
	var stdin io.Reader
	if term.IsTerminal(int(os.Stdin.Fd())) {
		stdin = os.Stdin
	}
	return newCommandIn(stdin, stdout, stderr, tty)
}

// newCommandIn is newCommand with forget's confirmation read from stdin (nil: not asked).
func newCommandIn(stdin io.Reader, stdout, stderr io.Writer, tty bool) *cobra.Command {
	c := &cli{stdin: stdin, stdout: stdout, stderr: stderr, tty: tty}
	def := os.Getenv("NKP_HOSTD_SOCKET")
	if def == "" {
		def = vmapi.DefaultSocket
	}
	vm := &cobra.Command{Use: "vm", Short: "protect libvirt domains with nkp (talks to nkp-hostd on this host)"}
	vm.PersistentFlags().StringVar(&c.socket, "socket", def, "nkp-hostd's local API socket (env NKP_HOSTD_SOCKET)")

	protect := &cobra.Command{
		Use:   "protect DOMAIN",
		Short: "give a shut-off domain an nkp vTPM (adopting its libvirt swtpm state, if any) and encrypt its disks; on a protected domain add what is missing; --finalize removes the original disk files kept",
		Args:  oneDomain,
		RunE: func(cmd *cobra.Command, args []string) error {
			if c.finalize {
				if cmd.Flags().Changed("disks") || c.protect.RemoveOriginal || c.protect.AllowDoubleEncryption {
					return fmt.Errorf("--finalize removes the kept original disk files and takes no other option: run protect first, then protect --finalize %s", args[0])
				}
				v, err := c.client().Finalize(cmd.Context(), args[0])
				return c.done(v, err)
			}
			if err := checkDisks(c.protect.Disks); err != nil {
				return err
			}
			p := c.progress()
			v, err := c.client().ProtectWith(cmd.Context(), args[0], c.protect, p.show)
			p.end()
			return c.done(v, err)
		},
	}
	protect.Flags().StringVar(&c.protect.Disks, "disks", vmapi.DisksAll, "all | none | target devs separated by commas (vda,vdb); all leaves out cdroms, floppies, read-only and shareable disks")
	protect.Flags().BoolVar(&c.protect.RemoveOriginal, "remove-original", false, "remove each original disk file once the domain uses its encrypted copy (default: kept until protect --finalize)")
	protect.Flags().BoolVar(&c.protect.AllowDoubleEncryption, "allow-double-encryption", false, "encrypt disks whose files sit on dm-crypt too")
	protect.Flags().BoolVar(&c.finalize, "finalize", false, "remove the original disk files that protect, rekey --deep and unprotect kept (idempotent)")
	protect.Flags().BoolVar(&c.asJSON, "json", false, "print the result as JSON")
	status := &cobra.Command{
		Use:   "status [DOMAIN]",
		Short: "show a domain's nkp objects, key IDs and KDK versions, and its TPM's health; all protected domains without DOMAIN",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.status(cmd.Context(), args)
		},
	}
	status.Flags().BoolVar(&c.asJSON, "json", false, "print JSON")
	rekey := &cobra.Command{
		Use:   "rekey DOMAIN",
		Short: "move a shut-off domain's vTPM state and disk keys to the primary KDK version (disks: a new keyslot; --deep: data re-encrypted under a new master key)",
		Args:  oneDomain,
		RunE: func(cmd *cobra.Command, args []string) error {
			p := c.progress()
			v, err := c.client().RekeyWith(cmd.Context(), args[0], vmapi.RekeyRequest{Deep: c.deep}, p.show)
			p.end()
			return c.done(v, err)
		},
	}
	rekey.Flags().BoolVar(&c.deep, "deep", false, "re-encrypt every disk into a new file under a new master key (the old file kept until protect --finalize)")
	rekey.Flags().BoolVar(&c.asJSON, "json", false, "print the result as JSON")
	unprotect := &cobra.Command{
		Use:   "unprotect DOMAIN",
		Short: "give a shut-off domain back to libvirt: its vTPM becomes libvirt's swtpm with the same state (--tpm keep), or is removed (--tpm none)",
		Args:  oneDomain,
		RunE: func(cmd *cobra.Command, args []string) error {
			if c.tpm != vmapi.UnprotectKeep && c.tpm != vmapi.UnprotectNone {
				return fmt.Errorf("--tpm %q: want %q (libvirt's swtpm keeps the vTPM's state) or %q (the vTPM and its state are deleted)", c.tpm, vmapi.UnprotectKeep, vmapi.UnprotectNone)
			}
			p := c.progress()
			v, err := c.client().UnprotectWith(cmd.Context(), args[0], vmapi.UnprotectRequest{TPM: c.tpm}, p.show)
			p.end()
			return c.done(v, err)
		},
	}
	unprotect.Flags().StringVar(&c.tpm, "tpm", vmapi.UnprotectKeep, "keep | none")
	unprotect.Flags().BoolVar(&c.asJSON, "json", false, "print the result as JSON")
	forget := &cobra.Command{
		Use:   "forget UUID|NAME",
		Short: "for a VM deleted for good (virsh undefine): remove its objects from the provider's catalog (so their KDK version can be retired), its vTPM state (the TPM's secrets: irreversible), its kept original disk files and its journal entries",
		Args:  oneDomain,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.forget(cmd.Context(), args[0])
		},
	}
	forget.Flags().BoolVar(&c.yes, "yes", false, "do not ask: the VM is gone for good, and its vTPM's secrets may be destroyed")
	forget.Flags().BoolVar(&c.localOnly, "local-only", false, "do not ask the provider (this host is revoked, or can no longer reach it): remove only this host's side and leave the VM's catalog objects to an administrator (nkpctl provider objects forget)")
	forget.Flags().BoolVar(&c.asJSON, "json", false, "print the result as JSON (needs --yes)")
	vm.AddCommand(protect, status, rekey, unprotect, forget)
	return vm
}

// forget asks for confirmation unless --yes, then has hostd forget the VM.
func (c *cli) forget(ctx context.Context, domain string) error {
	cl := c.client()
	catalog := "removes its objects from the provider's catalog so that their KDK version can be retired"
	if c.localOnly {
		catalog = "leaves its objects in the provider's catalog for an administrator to remove (nkpctl provider objects forget)"
	}
	if !c.yes {
		if c.stdin == nil || c.asJSON {
			return c.fail(&vmapi.APIError{Body: vmapi.Error{Code: vmapi.CodeConfirm, Error: fmt.Sprintf("nkpctl vm forget %s destroys that VM's vTPM state (its TPM's keys and sealed secrets: nothing brings them back) and the original disk files kept for it, and %s; nothing was changed: run it again with --yes once you are sure the VM is gone for good (not running on another host)", domain, catalog)}})
		}
		// Ask hostd without confirming: it refuses a defined domain, an unknown or
		// ambiguous name with its own sentence, and only then asks for the confirmation.
		if _, err := cl.Forget(ctx, domain, vmapi.ForgetRequest{LocalOnly: c.localOnly}); !vmapi.IsCode(err, vmapi.CodeConfirm) {
			if err == nil {
				err = fmt.Errorf("vm %s: hostd forgot the VM without the confirmation", domain)
			}
			return err
		}
		if v, err := cl.Get(ctx, domain); err == nil {
			for _, p := range v.Problems {
				fmt.Fprintf(c.stderr, "  %s\n", p)
			}
		}
		fmt.Fprintf(c.stderr, "Forget VM %s? Its vTPM state (the TPM's keys and sealed secrets) and the original disk files kept for it are deleted for good; this %s. Type yes to go on: ", domain, catalog)
		line, _ := bufio.NewReader(c.stdin).ReadString('\n')
		if strings.TrimSpace(line) != "yes" {
			return fmt.Errorf("not confirmed: nothing was changed")
		}
	}
	f, err := cl.Forget(ctx, domain, vmapi.ForgetRequest{Confirm: true, LocalOnly: c.localOnly})
	if err != nil {
		return c.fail(err)
	}
	if c.asJSON {
		return c.json(f)
	}
	name := f.UUID
	if f.Domain != "" {
		name = fmt.Sprintf("%s (%s)", f.Domain, f.UUID)
	}
	fmt.Fprintf(c.stdout, "%s: forgotten: %s\n", name, f.Note)
	for _, o := range f.Unregistered {
		fmt.Fprintf(c.stdout, "  catalog: removed %-10s key %s  KDK version %d\n", o.Name, o.KeyID, o.KDKVersion)
	}
	for _, o := range f.LeftInCatalog {
		v := "KDK version unknown"
		if o.KDKVersion > 0 {
			v = fmt.Sprintf("KDK version %d", o.KDKVersion)
		}
		fmt.Fprintf(c.stdout, "  catalog: left    %-10s key %s  %s (local only: an administrator removes it)\n", o.Name, o.KeyID, v)
	}
	for _, o := range f.OtherHosts {
		fmt.Fprintf(c.stdout, "  catalog: left    %-10s key %s  KDK version %d (host %s owns it)\n", o.Name, o.KeyID, o.KDKVersion, o.HostID)
	}
	if f.StateRemoved != "" {
		fmt.Fprintf(c.stdout, "  vTPM state removed: %s\n", f.StateRemoved)
	}
	for _, p := range f.FilesRemoved {
		fmt.Fprintf(c.stdout, "  kept file removed: %s\n", p)
	}
	for _, p := range f.Problems {
		fmt.Fprintf(c.stdout, "  problem: %s\n", p)
	}
	return nil
}

func (c *cli) client() *vmapi.Client { return vmapi.NewClient(c.socket) }

func (c *cli) done(v vmapi.VM, err error) error {
	if err != nil {
		return c.fail(err)
	}
	if c.asJSON {
		return c.json(v)
	}
	if v.Note != "" {
		fmt.Fprintf(c.stdout, "%s: %s\n", v.Domain, v.Note)
	}
	c.describe(v)
	return nil
}

// fail returns err; with --json it also prints it as vmapi.Error on standard output, so
// that a script reads the code (running, unavailable, …) without parsing the sentence.
// An error that did not come from hostd has the code vmapi.CodeNoHostd.
func (c *cli) fail(err error) error {
	if !c.asJSON {
		return err
	}
	body := vmapi.Error{Error: err.Error(), Code: vmapi.CodeNoHostd}
	var ae *vmapi.APIError
	if errors.As(err, &ae) {
		body = ae.Body
	}
	c.json(body)
	return err
}

// oneDomain is cobra.ExactArgs(1) with a sentence that says what DOMAIN is.
func oneDomain(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("%s needs one DOMAIN, a name or UUID as virsh list --all shows them (got %d arguments)", cmd.CommandPath(), len(args))
	}
	return nil
}

func (c *cli) status(ctx context.Context, args []string) error {
	cl := c.client()
	if len(args) == 1 {
		v, err := cl.Get(ctx, args[0])
		if err != nil {
			return c.fail(err)
		}
		if c.asJSON {
			return c.json(v)
		}
		c.describe(v)
		return nil
	}
	l, err := cl.List(ctx)
	if err != nil {
		return c.fail(err)
	}
	if c.asJSON {
		return c.json(l)
	}
	if len(l.VMs) == 0 {
		fmt.Fprintln(c.stdout, "no protected domains on this host")
		return nil
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tUUID\tSTATE\tTPM\tVTPM KEY ID\tKDK\tDISKS\tPROBLEMS")
	for _, v := range l.VMs {
		key, kdkv := "-", "-"
		for _, o := range v.Objects {
			if o.Name == "vtpm" {
				key, kdkv = o.KeyID, fmt.Sprint(o.KDKVersion)
				if !o.Primary {
					kdkv += " (not primary)"
				}
			}
		}
		enc := 0
		for _, d := range v.Disks {
			if d.Protected {
				enc++
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d/%d encrypted\t%d\n", v.Domain, v.UUID, state(v), orDash(v.TPM), key, kdkv, enc, len(v.Disks), len(v.Problems))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// The problems themselves: a count alone sends the operator to status DOMAIN.
	for _, v := range l.VMs {
		for _, p := range v.Problems {
			fmt.Fprintf(c.stdout, "%s: problem: %s\n", v.Domain, p)
		}
	}
	return nil
}

func (c *cli) describe(v vmapi.VM) {
	w := c.stdout
	if !v.Protected {
		fmt.Fprintf(w, "%s (%s): not protected by nkp, %s\n", v.Domain, v.UUID, state(v))
	} else {
		fmt.Fprintf(w, "%s (%s): protected, keys from provider %s, %s", v.Domain, v.UUID, v.ProviderID, state(v))
		if v.TPM != "" {
			fmt.Fprintf(w, ", TPM %s", v.TPM)
		}
		fmt.Fprintln(w)
	}
	for _, o := range v.Objects {
		p := "primary"
		if !o.Primary {
			p = "not primary: nkpctl vm rekey " + v.Domain
		}
		fmt.Fprintf(w, "  %-10s key %s  KDK version %d (%s)\n", o.Name, o.KeyID, o.KDKVersion, p)
	}
	for _, d := range v.Disks {
		file := d.File
		if file == "" {
			file = "-"
		}
		if !d.Protected {
			note := d.Note
			if note == "" {
				note = "not encrypted"
			}
			fmt.Fprintf(w, "  disk %-5s %s (%s)\n", d.Target, file, note)
			continue
		}
		p := "primary"
		if !d.Primary {
			p = "not primary: nkpctl vm rekey " + v.Domain
		}
		fmt.Fprintf(w, "  disk %-5s %s  key %s  KDK version %d (%s)\n", d.Target, file, d.KeyID, d.KDKVersion, p)
		if l := d.LUKS; l != nil {
			fmt.Fprintf(w, "             LUKS %s, ivgen %s, hash %s, %d PBKDF iterations, %d active keyslot(s)\n", l.Cipher, l.IVGen, l.Hash, l.Iters, l.ActiveSlots)
		}
		if d.OpenedEncrypted != nil {
			if *d.OpenedEncrypted {
				fmt.Fprintf(w, "             QEMU opened it encrypted\n")
			} else {
				fmt.Fprintf(w, "             QEMU opened it UNENCRYPTED\n")
			}
		}
		for _, o := range d.Originals {
			fmt.Fprintf(w, "             original kept: %s (nkpctl vm protect --finalize %s removes it)\n", o, v.Domain)
		}
	}
	for _, p := range v.Problems {
		fmt.Fprintf(w, "  problem: %s\n", p)
	}
}

// checkDisks checks --disks before hostd is asked.
func checkDisks(sel string) error {
	if sel == vmapi.DisksAll || sel == vmapi.DisksNone {
		return nil
	}
	for _, t := range strings.Split(sel, ",") {
		if t == "" || strings.Trim(t, "abcdefghijklmnopqrstuvwxyz0123456789_-.") != "" || len(t) > 32 {
			return fmt.Errorf("--disks %q: want all, none, or target devs separated by commas, like vda,vdb (see virsh domblklist)", sel)
		}
	}
	return nil
}

// progress draws the disks' progress on stderr.
type progress struct {
	c     *cli
	bars  map[string]*progressbar.ProgressBar
	phase map[string]string
	step  map[string]int // plain lines: the last 10% printed
}

func (c *cli) progress() *progress {
	return &progress{c: c, bars: map[string]*progressbar.ProgressBar{}, phase: map[string]string{}, step: map[string]int{}}
}

func (p *progress) show(ev vmapi.Progress) {
	w := p.c.stderr
	if ev.Phase == vmapi.PhaseWait {
		other := ev.Note
		if other == "" {
			other = "another operation"
		}
		fmt.Fprintf(w, "waiting: nkp-hostd runs one VM operation at a time, and %s is running; this one starts when it ends\n", other)
		return
	}
	what := map[string]string{"convert": "converting", "verify": "verifying", "done": "done"}[ev.Phase]
	if what == "" {
		what = ev.Phase
	}
	size := ""
	if ev.Size > 0 {
		size = fmt.Sprintf(" (%d MiB)", ev.Size>>20)
	}
	if !p.c.tty {
		pct := int(ev.Done * 100)
		if p.phase[ev.Disk] != ev.Phase {
			p.phase[ev.Disk], p.step[ev.Disk] = ev.Phase, pct/10
			fmt.Fprintf(w, "disk %s%s: %s %d%%\n", ev.Disk, size, what, pct)
			return
		}
		if pct/10 > p.step[ev.Disk] {
			p.step[ev.Disk] = pct / 10
			fmt.Fprintf(w, "disk %s%s: %s %d%%\n", ev.Disk, size, what, pct)
		}
		return
	}
	b := p.bars[ev.Disk]
	if b == nil || p.phase[ev.Disk] != ev.Phase {
		if b != nil {
			b.Finish()
			fmt.Fprintln(w)
		}
		b = progressbar.NewOptions(1000, progressbar.OptionSetWriter(w), progressbar.OptionSetDescription("disk "+ev.Disk+size+": "+what),
			progressbar.OptionShowElapsedTimeOnFinish(), progressbar.OptionSetPredictTime(true), progressbar.OptionFullWidth(), progressbar.OptionThrottle(100*time.Millisecond))
		p.bars[ev.Disk], p.phase[ev.Disk] = b, ev.Phase
	}
	b.Set(int(ev.Done * 1000))
	if ev.Phase == "done" {
		b.Finish()
		fmt.Fprintln(w)
	}
}

func (p *progress) end() {
	for d, b := range p.bars {
		if p.phase[d] != "done" {
			b.Exit()
			fmt.Fprintln(p.c.stderr)
		}
	}
}

func state(v vmapi.VM) string {
	if v.Running {
		return "running"
	}
	return "shut off"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	if i := strings.IndexByte(s, ':'); i > 0 {
		return s[:i]
	}
	return s
}

func (c *cli) json(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
