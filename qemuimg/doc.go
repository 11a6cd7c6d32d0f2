// Package qemuimg drives qemu-img as a library for the images nkp protects: LUKS inside
// qcow2 and raw LUKS, converted from plain raw or qcow2 sources.
//
// Operations: Create, Convert (with progress), Compare, AddKey and RemoveKey (keyslots),
// Info and Chain (qemu-img info; it opens images without I/O, so it does not try the
// key), Unlock (proves a key opens the image, through qemu-img map), Check, and Measure
// (the space a conversion needs, for a check against free space before it starts).
//
// Every call runs one qemu-img process with its arguments checked here, so that no path or
// key can change what qemu-img is asked to do:
//
//   - Secrets never reach argv, the environment or a file that outlives the call. Each
//     secret is written to a pipe before qemu-img starts and handed over as an inherited
//     fd, named on the command line as `--object secret,id=…,file=/dev/fd/N`; the caller's
//     buffer is not kept, and the copy made for the pipe is wiped.
//   - Images are always opened with an explicit driver (`--image-opts driver=…`), never by
//     probing: a raw guest disk that looks like a qcow2 header cannot make qemu-img follow
//     a backing file of the guest's choosing. Paths must be absolute, so a name such as
//     "json:{…}" or "nbd:…" is never read as a protocol, and commas in paths are doubled as
//     QEMU's option syntax requires, so a path cannot add options.
//   - qemu-img's failures become an *Error whose Kind (ErrWrongKey, ErrNoSpace,
//     ErrNotFound, ErrLocked, ErrDiffer, ErrCorrupt) callers test with errors.Is, and whose
//     text names the image, the reason and what to do, with qemu-img's own last line.
//
// The keys nkp derives are 256-bit random, so LUKS' PBKDF adds nothing to their strength:
// [DefaultIterTime] keeps it at QEMU's minimum, and an image opens in milliseconds instead
// of QEMU's default of about two seconds per disk. Callers encode the key as they like
// (nkp's host daemon passes the lowercase hex of the derived key, which libvirt secrets,
// cryptsetup and qemu-img all take as a passphrase without surprises).
//
// Who may import it: hostd and tests. It imports only the standard library.
package qemuimg
