// Package vm protects libvirt domains with nkp: protect, status, rekey and unprotect,
// served as an http.Handler on hostd's local API (wire types in hostd/vm/vmapi).
//
// What it needs from the rest of hostd is declared here as small interfaces: Keys (the
// KDK cache: the primary version and key derivation), Libvirt (a domain's persistent
// XML, define, whether it runs, a libvirt secret's value, the TPM check of a running
// VM) and Catalog (the provider's catalog; *provider/client.Client fits).
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
// temp, fsync, rename, fsync dir). Each writes the new state completely (fsynced and read
// back) before it defines the new XML, and removes the old state only after. A crash at
// any instant therefore leaves a domain whose XML names keys whose state is on disk: it
// boots with the old keys or the new ones, never neither. Recover, run at hostd's start
// and before any operation on a VM with a journal, finishes or rolls back what the crash
// interrupted (catalog entries, leftover directories), deciding by the XML alone. The
// tests kill a child process with SIGKILL after each journaled step and check both the
// state left and the recovery (crash_test.go).
//
// Operations need a shut-off domain, and hold the swtpm state directory's lock while
// they run, so a VM started meanwhile cannot use state being replaced (its vTPM refuses
// to start on a locked directory).
//
// Importers: hostd (mounts Handler on the local API and calls Recover at start), tests.
//
// Order against the provider's catalog: protect registers its objects before the
// define (the catalog may hold an entry that no XML uses yet, never the reverse);
// rekey and unprotect update it after. TestAdoptedTPMKeepsEKAndNV shows the same EK
// and NV value through the real swtpm before and the real nkp-swtpm after adoption
// and after rekey. The operator's guide is docs/vm.md.
package vm
