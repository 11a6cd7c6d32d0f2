// Package hostd is nkp's host daemon (cmd/nkp-hostd): it joins a provider (Join), keeps
// the cluster's KDK versions cached so that only this host's TPM can unwrap them
// (hostd/kdkcache), answers libvirt's qemu hook synchronously over a root-only unix
// socket (hooks/hookproto), runs one nkp-swtpm per running protected VM
// (hostd/vtpm), and serves a local API (health, readiness, Prometheus metrics, the VM
// operations of hostd/vm) on another root-only socket.
//
// The daemon has etcd embed's shape: Start(ctx, cfg) returns a *Daemon whose Ready is
// closed once both sockets listen, and whose Done is closed when it stopped — because
// Close was called, ctx ended, or any serving goroutine (hook listener, API listener,
// provider sync, libvirt events) failed; Err then says why. A dead listener therefore
// ends the process instead of leaving a healthy-looking one.
//
// Hooks are answered without calling libvirt (the hook holds one of libvirtd's workers;
// calling back can deadlock): the domain XML on the hook's stdin is all hostd reads.
// What a hook missed is reconciled from libvirt's lifecycle events and at start-up. On
// each started event of a VM protected with this provider's keys (boot, restore,
// incoming migration) hostd claims its catalog objects for this host off the event loop
// (vm.Manager.Claim, a few tries while the provider does not answer), so that ownership
// follows where the VM runs and a forget on the host it left cannot remove them.
// The decisions themselves are pure (hostd/lifecycle). The prepare hook checks the keys
// and launches the VM's nkp-swtpm (vtpm.Supervisor.Launch) without waiting for it; the
// start hook, which libvirt runs just before QEMU, waits until it serves and refuses
// with the reason if it did not start: nkp-swtpm's start overlaps libvirt's own work
// between the two hooks instead of lengthening the prepare hook.
//
// Encrypted disks: each disk object of a domain's nkp metadata ("disk:<target>") has
// its LUKS passphrase in an ephemeral, private libvirt secret, UUID
// domxml.SecretUUID(vm, key ID), which hostd keeps defined (hostd/disksecret): at start
// and after libvirtd reconnects (ephemeral secrets vanish when libvirtd restarts), when a
// new KDK version arrives, on domain defined/undefined/started/stopped events, when
// another process changes or undefines one (defined again with the right value), every
// SyncInterval, and from the VM operations (vm.Config.Secrets). Secrets no domain uses
// are undefined. The prepare, restore and migrate hooks of a domain with disk objects
// are answered from memory: every disk's secret must be defined by this hostd (and its
// image not known to refuse the key), else the hook refuses with a sentence naming the
// VM, disk, key ID and KDK version and the way out — typically "nkp-hostd is defining it
// now: run virsh start again in a few seconds" — and queues the definition from the
// hook's XML, so the retry (or, for an incoming migration or a transient domain, the
// prepare that follows) succeeds. Metrics: nkp_hostd_disk_secrets_defined,
// nkp_hostd_disk_secret_reconcile_errors_total.
//
// The provider: KDK releases are fetched at start and every SyncInterval; new versions
// are cached, retired ones deleted. While the provider is unreachable hostd works from
// the cache, logs a warning once, sets nkp_hostd_provider_reachable to 0, and adds a
// warning to the hook's answer. A host the provider reports as revoked (policy) deletes
// its KDK cache at once, undefines the disks' libvirt secrets (from the secrets
// manager's goroutine: the revocation may be noticed inside a hook), and refuses every
// later start of a protected VM with a sentence saying so; VMs already running keep their
// vTPM (their keys are in their nkp-swtpm) and their open disks,
// since killing running guests would lose data. The host certificate is renewed when
// less than RenewBefore (default: a third of its lifetime) is left.
//
// Importers: cmd/nkp-hostd and tests. hostd may import provider/{client,apiv1,kdk},
// swtpm/{cmdline,ctrl,state}, systemd, internal/..., its own subpackages — never the
// provider's domain or stores.
//
// Files: the state directory (0711) holds host.json, host.key (0600), host.crt,
// ca.crt, kdk/v<N>.json (0600 in 0700: the TPM import blob only), the vTPM states
// vtpm/<uuid>/<key-id>/ (the vTPM user's, 0700) and their logs vtpm/<uuid>.log; the
// run directory holds hook.sock and hostd.sock (0600), each vTPM's control socket
// vtpm/<uuid>.sock (0600, owned by QEMU's user: hostd creates it and passes it as a
// listening fd), its status channel vtpm/<uuid>.status (root's, 0600: nkpctl vm status
// asks the running vTPM there whether it answers) and the instance records
// vtpm/<uuid>.json used for adoption.
package hostd
