// Package domxml reads and edits the parts of a libvirt domain XML that nkp owns: its
// own metadata element (<nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1"> inside <metadata>:
// the provider ID and, per protected object, the key ID, the KDK ID and the KDK version),
// the domain's <tpm> device (nkp's <backend type='external'> socket, or the
// libvirt-managed <backend type='emulator'> that protect adopts, with its
// <active_pcr_banks>, which the vtpm object keeps as pcr-banks="…" while the domain is
// protected), and its <disk> devices.
//
// Disks: Parse reads each <disk>'s type, device, target dev and bus, live alias, source
// file (or block dev), driver name and type, readonly and shareable, <encryption> (inside
// <source>, or directly inside <disk> where older definitions put it) and the first file
// of a <backingStore> chain. SetDisk rewrites one file disk into the form nkp uses for a
// protected disk — <driver type='qcow2'> (LUKS inside qcow2) or type='raw' (raw LUKS),
// <source file='NEW'><encryption format='luks'><secret type='passphrase'
// uuid='SecretUUID'/></encryption></source>, every <backingStore> removed (the new
// image holds the whole chain) — and back to plain (Encryption nil). Other attributes of
// <driver> and <source>, <source>'s other children (seclabel) and the disk's other
// elements (boot order, address) are kept.
//
// Edits are splices: Edit finds the byte ranges of the elements it replaces with
// encoding/xml's decoder and leaves every other byte of the document as it was, so
// elements nkp does not know (other applications' metadata, devices, comments) survive.
// libvirt is the judge of the result: the tests define what Edit writes with a real
// libvirtd and read it back with dumpxml.
//
// The input is untrusted (a hook's stdin, a user's domain): Parse bounds its size and
// every error names the element and the reason; at most MaxDisks disks are read. Fuzz
// targets: FuzzParse, FuzzEdit (SetDisk).
//
// The package is pure (no I/O). Importers: hostd/vm (protect, status, rekey,
// unprotect), hostd (the hook handler reads the metadata at prepare), and tests.
package domxml
