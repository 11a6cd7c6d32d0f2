// Package libtpms is nkp's TPM 2.0 engine: libtpms (Debian's libtpms-dev,
// 0.9.2) through cgo. Only the vTPM server in package swtpm imports it.
//
// libtpms keeps its TPM in global C state, so a process has at most one TPM:
// Open returns ErrInUse while another is open. All cgo lives in
// engine_cgo.go, callbacks_cgo.go, conn_cgo.go and conn.c (build tag cgo);
// without cgo every call fails with ErrNoCgo. The package's one mutable
// package-level Go variable is the pointer to the open TPM, which libtpms'
// callbacks use to reach its NVRAM: it mirrors libtpms' own global. Every
// call into libtpms is serialised by the engine's lock, a recursive C mutex
// (conn.c) that Go takes with its OS thread locked (Lock, Unlock); Cancel
// alone does not wait for it. The TPM's running flag, locality, last command
// code and libtpms' response buffer are C state under that lock. With
// SetOffThread, MainInit and Process make their libtpms call on a short-lived
// thread of their own (its NVRAM callbacks enter Go from there) while the
// caller holds the lock and waits in Go's poller: the vTPM server does that for
// the start at launch, so that its one P answers control clients meanwhile.
//
// ServeConn serves a data connection with a loop in C (poll, read,
// TPMLIB_Process, send), so that a TPM command costs no transition into Go;
// Go is entered only for the NVRAM callbacks (a state store, before the
// response is sent) and to report a failed command. Its framing is held to
// package swtpm/data's by FuzzFrameMatchesData.
//
// # Lifecycle
//
//	tpm, err := libtpms.Open(nvram)    // register callbacks, choose TPM 2.0
//	tpm.SetState(libtpms.Permanent, p) // optional: incoming migration
//	tpm.SetState(libtpms.Volatile, v)
//	tpm.MainInit()                     // load or manufacture; CMD_INIT
//	rsp, err := tpm.Process(cmd)       // data channel
//	tpm.Terminate()                    // CMD_STOP; MainInit may follow again
//	tpm.Close()
//
// # How libtpms 0.9.2 uses the NVRAM callbacks
//
// Read in libtpms' source (tpm_tpm2_interface.c, tpm2/LibtpmsCallbacks.c,
// tpm2/ExecCommand.c, tpm2/StateMarshal.c) and checked by this package's
// tests, which record every NVRAM call:
//
//   - MainInit loads "permall" (twice: once to see whether it exists, once
//     to unmarshal it), then "volatilestate". When Load reports
//     fs.ErrNotExist for permall (the callback answers TPM_RETRY), libtpms
//     manufactures a new TPM and stores its permall before MainInit returns.
//     A volatilestate that loads makes the TPM resume where it was saved,
//     without TPM2_Startup; deleting it first (swtpm's INIT with
//     DELETE_VOLATILE) gives a TPM that wants Startup. Blobs given with
//     SetState are used instead of the NVRAM's; MainInit then stores the
//     permanent one through the NVRAM.
//   - "permall" is stored synchronously inside Process, at the end of every
//     command that changed NV-backed data (libtpms' g_updateNV): NV
//     define/write/increment/extend, hierarchy and auth changes, persistent
//     objects, the dictionary-attack counter, TPM2_Startup, TPM2_Shutdown and
//     orderly-state changes. The store happens after the response is built
//     and before TPMLIB_Process returns, so when Process returns, the Store
//     for that command has returned. Commands that change nothing stored
//     (GetRandom, PCR_Extend, PCR_Read, CreatePrimary, FlushContext, and an
//     NV_Write of the bytes already there) store nothing.
//   - If Store fails, libtpms enters failure mode (FATAL_ERROR_INTERNAL):
//     Process returns an error wrapping the Store error, and every later
//     command gets TPM_RC_FAILURE until Terminate and MainInit, which reload
//     the last stored permall. The server must not acknowledge such a
//     command.
//   - libtpms never stores "volatilestate" or "savestate" by itself, and
//     Terminate stores nothing: the server stores VolatileAllStore's blob
//     when swtpm would (STORE_VOLATILE, shutdown). Only libtpms' TPM 1.2
//     code calls the delete callback (TPM_PermanentAll_NVDelete,
//     TPM_SaveState_NVDelete); for a TPM 2 no test saw one, so the server
//     deletes what it must itself.
//   - Without registered callbacks libtpms would write a 176 KB NVChip file
//     into the working directory; Open always registers them, so nothing
//     is written there.
//
// Blobs cross the boundary as C copies that are wiped before they are freed:
// Load's result is copied into a malloc'd buffer that libtpms frees, and
// the Go copies of loaded and stored blobs are wiped when the callback
// returns, so NVRAM implementations must neither keep the slice given to
// Store nor expect the one returned by Load to stay intact.
//
// # Linking
//
// make build links libtpms and libcrypto into nkp-swtpm (-tags nkpstatic): the
// static archives of libtpms-dev and libssl-dev, libc staying shared. The
// loader then has no libcrypto relocations to apply (about 1 ms of each start,
// and about 400 KB of private relocated pages per vTPM): start-to-ready is
// 0.75-0.9 of swtpm 0.7.1's (the shared build's about 1.0) and an idle vTPM's
// PSS about 0.85 of the shared build's (BENCHMARKS.md). The price is how security updates arrive: an update of
// libtpms or OpenSSL does not reach a static nkp-swtpm by itself. Install the
// updated libtpms-dev and libssl-dev (apt upgrade), rebuild (make build) and
// restart the vTPMs; a distribution package declares Built-Using: libtpms,
// openssl and is rebuilt on their updates. Linked reports what the process
// runs, and nkp-swtpm logs it in its "nkp-swtpm serving" line (libtpms=,
// openssl=, static=), so a vTPM still running an old build can be found;
// `go version -m nkp-swtpm` shows -tags=nkpstatic for a static build.
//
// make build also gives the linker hot.ld (-ldflags=-extldflags=-Wl,-T,...): the 216
// objects of libcrypto.a and libtpms.a whose code runs from exec until a vTPM is idle
// (found by hotlayout.sh: gdb, a breakpoint on every archive function, a start on new
// and on existing state) go ahead of the others in .text, .rodata and .data.rel.ro.
// Their code, 0.55 MB, was spread over 2.1 MB of the binary; the kernel maps a file
// in 64 KB fault-around windows, so an idle vTPM now maps about 1.5 MB less of its
// binary (about 100 KiB less PSS with 8 side by side, BENCHMARKS.md). Code that runs
// later (TPM commands) is still mapped when it first runs. TestHotLayout checks that
// every object hot.ld names is in the installed archives: after an OpenSSL or libtpms
// update that renames objects, regenerate it (the comment at the top of
// hotlayout.sh); a stale list costs memory, never correctness.
//
// Without the tag (make build-shared, or a plain go build ./cmd/nkp-swtpm, as
// the e2e tests do without NKP_BIN) libtpms and libcrypto are Debian's shared libraries (libtpms0,
// libssl3): their security updates reach nkp-swtpm with apt, at the next start
// of each vTPM.
package libtpms
