// Package domxml reads and edits the parts of a libvirt domain XML that nkp owns: its
// own metadata element (<nkp:vm xmlns:nkp="https://nkp.dev/ns/vm/1"> inside <metadata>:
// the provider ID and, per protected object, the key ID, the KDK ID and the KDK version)
// and the domain's <tpm> device (nkp's <backend type='external'> socket, or the
// libvirt-managed <backend type='emulator'> that protect adopts).
//
// Edits are splices: Edit finds the byte ranges of the elements it replaces with
// encoding/xml's decoder and leaves every other byte of the document as it was, so
// elements nkp does not know (other applications' metadata, devices, comments) survive.
// libvirt is the judge of the result: the tests define what Edit writes with a real
// libvirtd and read it back with dumpxml.
//
// The input is untrusted (a hook's stdin, a user's domain): Parse bounds its size and
// every error names the element and the reason. Fuzz targets: FuzzParse, FuzzEdit.
//
// The package is pure (no I/O). Importers: hostd/vm (protect, status, rekey,
// unprotect), hostd (the hook handler reads the metadata at prepare), and tests.
package domxml
