// Package vm protects libvirt domains with nkp: protect, status, rekey, unprotect and
// forget, served as an http.Handler on hostd's local API (wire types in hostd/vm/vmapi).
//
// What it needs from the rest of hostd is declared here as small interfaces: Keys (the
// KDK cache: the primary version and key derivation), Libvirt (a domain's persistent
// XML, define, whether it runs, is persistent or has a managed save image, a libvirt
// secret's value, the TPM check and the disks'
// encryption of a running VM), Catalog (the provider's catalog; *provider/client.Client
// fits) and Secrets (hostd's keeper of the disks' libvirt secrets). Disk images are
// converted, compared and rekeyed with qemuimg.
//
// # Disks
//
// ProtectWith encrypts a domain's file disks (vmapi.ProtectRequest.Disks: all, none or
// targets; cdroms, floppies, read-only and shareable disks are skipped with a note unless
// named; block and network disks are refused when named). Each disk is one object
// "disk:<target>" with its own key ID on the primary KDK version; its LUKS passphrase is
// the lowercase hex of Keys.Derive(purpose "disk", VM UUID, key ID), handed to qemu-img
// by pipe and to QEMU only through the libvirt secret domxml.SecretUUID(VM, key ID) that
// Secrets keeps defined. Before anything changes each disk is checked (no <encryption>,
// no encrypted image or backing file per qemu-img, raw or qcow2, not on dm-crypt unless
// AllowDoubleEncryption) and every conversion measured against its filesystem's free
// space (ErrNoSpace, naming the space and the directory). Then each is converted next to
// its original — raw into raw LUKS <orig>.nkp-<key8>.luks, qcow2 into LUKS in qcow2
// <orig>.nkp-<key8>.qcow2, a backing chain flattened — 0600 and owned like the original,
// and compared with the original under its key; Secrets.Ensure, the catalog, and the XML
// switch follow (domxml.SetDisk). Originals are kept (listed in JournalDir/<uuid>.kept)
// until Finalize, or removed after the switch with RemoveOriginal; the list outlives the
// domain: for a domain undefined since, List and Status of its UUID report the kept files
// as a problem, and Finalize takes its UUID (or the name it had). Progress reaches the
// caller through a ProgressFunc (the Handler streams it as NDJSON).
//
// RekeyWith moves disks to the primary version shallowly (qemuimg.AddKey of the new key,
// switch, RemoveKey of the old: both keys open the image until the switch is done) or,
// with Deep, converts each disk under a new master key into a new file (the old one kept
// until Finalize). UnprotectWith converts each disk into a plain file
// (<orig>.nkp-plain-<key8>.img|qcow2), the encrypted one kept until Finalize. Status
// reports each disk: object, LUKS header read with its key (which proves the key opens
// it), originals kept, and for a running VM how QEMU opened it (BlockEncrypted reads QMP
// query-block against the live XML).
//
// # New vTPMs
//
// A new vTPM (the domain has no <tpm>, or libvirt's swtpm never ran) is manufactured
// before anything changes, as libvirt does at a new TPM's first start (Config.Setup,
// manufacture.go): swtpm_setup with libvirt's arguments (setupArgs: --vmid NAME:UUID, EKs
// with certificates, platform certificate, --lock-nvram, --not-overwrite, --pcr-banks
// from <active_pcr_banks>, else swtpm_setup.conf's default sha256) and nkp-swtpm as its
// TPM, run as the vTPM user in a staging directory VTPMDir/<uuid>/.setup-<random> under
// a one-time random key on a pipe (--keyfile-fd, aes-256-cbc). Its blobs are then read and
// written as the state of an adopted vTPM (a normal nkp state file under the vTPM's key,
// with the directory's own state ID), and the staging directory removed (one a killed
// hostd left is removed by Recover at its next start). swtpm_setup
// missing or failing fails the protect with ErrUnavailable naming the VM, the tool, its
// last log lines and the fix; nothing has changed then. Config.Setup nil keeps the old
// behaviour (empty state: libtpms' defaults, all PCR banks, no EK certificate). The
// <active_pcr_banks> of a replaced emulator TPM is kept on the vtpm object (PCRBanks)
// and given back by unprotect --tpm keep.
//
// # Layout
//
// A protected domain's vTPM state lives in StateDir(VTPMDir, uuid, keyID):
// VTPMDir/<vm-uuid>/<vtpm-key-id>/, written by swtpm/state under the key derived for that
// key ID. Naming the directory by key ID makes the domain XML the single commit point of
// every operation: the XML's metadata names the key, and the key names the directory, so
// a domain always finds the state that matches its keys.
//
// # Crash safety
//
// Protect, Rekey and Unprotect are journaled (one file per VM in JournalDir, written
// temp, fsync, rename, fsync dir; it lists each disk: original file, new file, old and
// new object, mode). Each writes the new state completely (fsynced and read back; disks
// converted, fsynced and compared) before it defines the new XML, and removes the old
// state only after; a disk's original file is never written. A crash at
// any instant therefore leaves a domain whose XML names keys whose state is on disk: it
// boots with the old keys or the new ones, never neither. Recover, run at hostd's start
// and before any operation on a VM with a journal, finishes or rolls back what the crash
// interrupted (catalog entries, leftover directories, a disk's new file or keyslot and
// its secret, the old keyslot and secret, the original kept for Finalize), deciding by
// the XML alone — per disk: does it name the new file (shallow rekey: the new key)? The
// tests kill a child process with SIGKILL after each journaled step and check both the
// state left and the recovery (crash_test.go: TestCrash for the vTPM, TestCrashDisks with
// real qemu-img for disks, TestCrashForget for forget).
//
// Operations need a shut-off, persistent domain without a managed save image (ErrSaved:
// virsh start would resume the image with the definition it was saved with, the old
// files and keys), and hold the swtpm state directory's lock while they run, so a VM
// started meanwhile cannot use state being replaced (its vTPM refuses to start on a
// locked directory). Finalize keeps a kept original that any process still has open
// (found through /proc/PID/fd): a VM resumed from a save or snapshot made before the
// change runs on it.
//
// # Forget
//
// Forget is the end of a VM deleted for good (virsh undefine): for a UUID (or the name
// the domain had, known from its record, kept files or journal entry; a name that two
// undefined VMs had is refused with ErrBadArgument listing their UUIDs) that libvirt does
// not define — a defined domain is refused with ErrDefined, naming unprotect and virsh
// undefine — and only when confirmed (ErrNotConfirmed: the vTPM state holds the TPM's
// secrets), it removes, journaled as opForget: the VM's objects in the provider's catalog
// that this host owns (Catalog.ForgetVM, one provider transaction), then its disks'
// libvirt secrets, the original disk files kept for it (as Finalize: a file another
// domain names or a process has open stays listed), its vTPM state directory (refused
// while an nkp-swtpm holds it) and its journal entry. An operation interrupted on the
// VM before it was undefined is replaced; its disk files are left and named.
//
// Order: the catalog first. If the provider does not answer, nothing changes on this host
// (the journal is put back as it was): a forget never leaves catalog entries whose state
// is gone unannounced, and never state whose entries are gone without a journal that
// finishes the job at hostd's start. If libvirt defines the VM again before a forget is
// finished, recovery registers the objects its definition names again and keeps its
// state: the catalog always holds what a defined VM uses, so retire never destroys a
// version a VM on this host still needs.
//
// Which objects: the catalog keys objects by VM UUID and name, and each has one owner, the
// host that registered it or took it over with MoveVM: Claim, which hostd runs when a VM
// starts on it (boot, restore, incoming migration), and any change of a VM whose objects
// another host owns (owned). Ownership thus follows where the VM last ran. Forget
// removes only this host's objects, never moves any, and reports those of other hosts
// (the VM moved there) without touching them, so a forget on the host a VM left cannot
// let a version the VM needs be retired. The gap left: a new host that could not reach the
// provider when the VM started there (hostd retries, then logs); docs/vm.md tells the
// operator to check the owner first. A host that is gone cannot forget at all: an
// administrator removes its objects (provider.ForgetObjects, `nkpctl provider objects
// forget`), which the provider allows only for a revoked or unenrolled host.
//
// A host the provider no longer accepts gets ErrRevoked from Forget, nothing changed. With
// vmapi.ForgetRequest.LocalOnly (ForgetWith; the operator asked for it explicitly and
// confirmed) the provider is not asked at all: the journal (LocalOnly, and Left: the
// objects as this host knew them, from the record or else the vTPM state directories'
// key IDs) is written, then the disks' secrets, kept files, vTPM state, record and
// journal go as above; the answer lists the objects left in the catalog and the commands
// that remove them (the administrator's, or a later plain Forget while the provider still
// accepts the host, which needs nothing local). Its recovery never asks the provider
// either, and a VM defined again meanwhile keeps its state without registering anything
// (nothing left the catalog).
//
// # Records
//
// Each protected VM has a record, JournalDir/<uuid>.vm (record.go; written temp, fsync,
// rename, fsync dir): the domain's name and its metadata's objects. It is written when an
// operation settles (recoverOneLocked, after protect, rekey and their recovery), by Claim
// when the VM starts here, by Status when the name or objects changed (virsh domrename),
// and by Recover for a VM with vTPM state but no record (protected by an older hostd);
// unprotect and forget remove it. It lets forget find a VM by the name it had whatever the
// VM kept (a vTPM-only VM has no kept files), and forget --local-only say what the
// catalog keeps. A VM undefined before any hostd recorded it is known by UUID only.
//
// Importers: hostd (mounts Handler on the local API and calls Recover at start), tests.
//
// Order against the provider's catalog: protect registers its objects before the
// define (the catalog may hold an entry that no XML uses yet, never the reverse);
// rekey and unprotect update it after. TestAdoptedTPMKeepsEKAndNV shows the same EK
// and NV value through the real swtpm before and the real nkp-swtpm after adoption
// and after rekey. The operator's guide is docs/vm.md.
package vm
