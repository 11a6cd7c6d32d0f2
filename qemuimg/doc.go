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
// The cipher of new images is AES-256 in XTS mode with plain64 IVs ([DefaultCipherAlg],
// [DefaultCipherMode], [DefaultIVGenAlg]), written out on every create rather than left
// to QEMU's defaults. It was chosen by measuring what QEMU 7.2 offers for LUKS
// (BENCHMARKS.md "Disks"); the cipher times below are the crypto section of
//
//	go run ./test/bench/diskbench -skip unlock,protect,io -memdir /dev/shm -xts twofish-256,serpent-256
//
// (the extra time of raw LUKS over plain raw on tmpfs). Debian's QEMU takes its ciphers
// from nettle 3.8 (`perf record -g -- qemu-io … <writes; perf report --no-children
// --sort dso,sym` shows nettle_xts_encrypt_message calling _nettle_aes256_encrypt_aesni
// one 16-byte block at a time, no libgnutls samples), so AES-XTS runs at about
// 500–600 MiB/s on a core where OpenSSL's does 6.4–8.4 GB/s (`openssl speed -bytes
// 4096 -evp aes-256-xts`):
//
//   - AES-256-XTS: about 7.5 µs to encrypt or decrypt 4 KiB.
//   - AES-128-XTS: sound (NIST SP 800-38E, BitLocker's and FileVault's choice) and the
//     closest to plain I/O, but only by about 1 µs per 4 KiB request (10–15 % of the
//     cipher's time): 0.01–0.02 of a 4 KiB ratio, less than the benchmark's run-to-run
//     noise. Where LUKS in qcow2 falls short, the gap is QEMU's hand-off of every
//     encrypted request to a worker thread, not the cipher. Disk images are long-lived
//     ciphertext that anyone who copies them can attack for years, so nkp keeps 256-bit
//     AES keys, as cryptsetup's LUKS2 default (aes-xts-plain64, 512-bit key) does.
//   - AES-256-CBC with ESSIV IVs (LUKS1's old default): decrypts 4 KiB in about 2.6 µs
//     (CBC decryption runs blocks in parallel), encrypts no faster than XTS. Not taken:
//     CBC is malleable, so whoever can write the image file can flip chosen bits of one
//     plaintext block by changing the ciphertext block before it (a backdoor was planted
//     in a cbc-essiv LUKS root filesystem this way, Lell 2013), and the host's disk files
//     are what nkp assumes an attacker may reach; under XTS a change turns 16 bytes into
//     noise the attacker cannot choose.
//   - Twofish-256-XTS and Serpent-256-XTS: about 2 and 5 times slower than AES here.
//   - Unsound for disks, so not considered: ECB (patterns show), CTR (a rewrite of a
//     sector reuses its keystream), CBC with plain/plain64 IVs (watermarking).
//
// Who may import it: hostd and tests. It imports only the standard library.
package qemuimg
