// Package guest builds nkp's tiny test guest and speaks its console protocol.
//
// The guest is a Debian cloud kernel plus an initramfs holding busybox, the virtio
// modules and a static Go agent (test/guest/agent) that exercises the VM's TPM through
// /dev/tpmrm0 and prints "NKP-GUEST key=value" lines on the serial console. The kernel
// command line (Config.KernelArgs) selects what the agent does; ParseConsole reads its
// results back. It boots to poweroff in seconds under QEMU TCG.
//
// Only test code and the demo import this package.
//
// The kernel is the package linux-image-cloud-amd64 depends on (apt-get download and
// dpkg-deb -x, once per version); the initramfs holds busybox-static, the six virtio
// modules, /init and the static agent, which prints tpm=2.0, pcr0=..., per action
// nvwrite=ok nv=..., nv=..., pcr16=..., diskwrite=vda disk-vda=..., diskread=vda
// disk-vda=..., and loop=N pcr0=... pcr16=... nv=... disk-vda=... every second, then
// done=ok or done=fail, and powers off. The disk actions write and read a marker block
// (DiskBlock) at DiskOffset of /dev/vdX with O_DIRECT, so a host can search the image
// file for it; a job of disk actions only runs without a TPM (tpm-device=none). Build caches both under
// DefaultDir (test/guest/out, gitignored), behind a flock, and rebuilds only when an
// input changes (sources, go.mod and go.sum, the Go version, busybox, the modules).
// From a shell: `go run ./test/guest/cmd/guest-build` prints NKP_GUEST_KERNEL=... and
// NKP_GUEST_INITRD=.... Under libvirt the domain needs <features><acpi/> (TPM CRB
// discovery and poweroff go through ACPI).
package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

//go:embed init.sh
var initScript []byte

// KernelMetaPackage is the Debian package whose dependency names the kernel image used.
const KernelMetaPackage = "linux-image-cloud-amd64"

// Modules are the kernel modules copied into the initramfs, in the order /init loads them.
var Modules = []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"}

// Busybox is the static busybox the initramfs is built around (Debian's busybox-static).
const Busybox = "/bin/busybox"

// Artifacts are the files that boot the guest: pass Kernel and Initrd to QEMU's -kernel
// and -initrd (or libvirt's <kernel> and <initrd>) and Config.KernelArgs as -append.
type Artifacts struct {
	Kernel        string // bzImage
	Initrd        string // gzip-compressed newc cpio archive
	KernelPackage string // the Debian package Kernel came from
}

// DefaultDir is the cache directory next to this package's sources (test/guest/out,
// ignored by git).
func DefaultDir() (string, error) {
	src, err := sourceDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(src, "out"), nil
}

func sourceDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok || !filepath.IsAbs(file) {
		return "", errors.New("guest: cannot locate the package's source directory (built with -trimpath?); run from a checkout with go test or go run")
	}
	dir := filepath.Dir(file)
	if _, err := os.Stat(filepath.Join(dir, "agent")); err != nil {
		return "", fmt.Errorf("guest: agent sources next to %s: %w; run from a checkout", file, err)
	}
	return dir, nil
}

// Build makes (or reuses) the guest's kernel and initramfs in the cache directory dir.
// The kernel is fetched once per Debian package version with apt-get download and
// unpacked with dpkg-deb (nothing is installed); the initramfs is rebuilt only when one
// of its inputs changed (agent and package sources, go.mod/go.sum, the Go version,
// busybox, the modules, /init). Concurrent builders on the same dir take turns.
func Build(ctx context.Context, dir string) (Artifacts, error) {
	src, err := sourceDir()
	if err != nil {
		return Artifacts{}, err
	}
	root := filepath.Dir(filepath.Dir(src))
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return Artifacts{}, fmt.Errorf("guest: module root %s: %w", root, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Artifacts{}, fmt.Errorf("guest: cache directory %s: %w", dir, err)
	}
	unlock, err := lockDir(ctx, dir)
	if err != nil {
		return Artifacts{}, err
	}
	defer unlock()

	pkg, err := kernelPackage(ctx)
	if err != nil {
		return Artifacts{}, err
	}
	kdir, err := fetchKernel(ctx, dir, pkg)
	if err != nil {
		return Artifacts{}, err
	}
	initrd, err := buildInitrd(ctx, dir, root, src, kdir, pkg)
	if err != nil {
		return Artifacts{}, err
	}
	return Artifacts{Kernel: filepath.Join(kdir, "vmlinuz"), Initrd: initrd, KernelPackage: pkg}, nil
}

// lockDir takes an exclusive flock on dir/.lock, polling so that ctx can end the wait.
func lockDir(ctx context.Context, dir string) (func(), error) {
	path := filepath.Join(dir, ".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("guest: lock %s: %w", path, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("guest: lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("guest: waiting for another build holding %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func run(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// kernelPackage returns the kernel image package that KernelMetaPackage depends on.
func kernelPackage(ctx context.Context) (string, error) {
	out, err := run(ctx, "", nil, "apt-cache", "depends", KernelMetaPackage)
	if err != nil {
		return "", fmt.Errorf("guest: kernel package: %w (run `apt-get update`, or `make setup`)", err)
	}
	pkg, err := parseDepends(string(out))
	if err != nil {
		return "", fmt.Errorf("guest: kernel package: %w", err)
	}
	return pkg, nil
}

// parseDepends picks the linux-image dependency from `apt-cache depends` output.
func parseDepends(out string) (string, error) {
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		dep, ok := strings.CutPrefix(line, "Depends: ")
		if ok && strings.HasPrefix(dep, "linux-image-") && !strings.ContainsAny(dep, " <>/") {
			return dep, nil
		}
	}
	return "", fmt.Errorf("no linux-image dependency in `apt-cache depends %s` output %q", KernelMetaPackage, out)
}

// fetchKernel returns dir/kernel-<pkg>, holding vmlinuz and modules/<name>.ko, making it
// from the Debian package when it is not there yet.
func fetchKernel(ctx context.Context, dir, pkg string) (string, error) {
	kdir := filepath.Join(dir, "kernel-"+pkg)
	if complete(kdir) {
		return kdir, nil
	}
	tmp, err := os.MkdirTemp(dir, ".kernel-")
	if err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	defer os.RemoveAll(tmp)
	// apt's download sandbox user (_apt) must be able to write here.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	if _, err := run(ctx, tmp, nil, "apt-get", "download", pkg); err != nil {
		return "", fmt.Errorf("guest: kernel: %w (needs network access to the Debian mirror once)", err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("guest: kernel: apt-get download %s left %d .deb files in %s, want 1", pkg, len(debs), tmp)
	}
	unpacked := filepath.Join(tmp, "root")
	if _, err := run(ctx, tmp, nil, "dpkg-deb", "-x", debs[0], unpacked); err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	out := filepath.Join(tmp, "out")
	if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(unpacked, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return "", fmt.Errorf("guest: kernel: package %s has %d boot/vmlinuz-* files, want 1", pkg, len(vmlinuz))
	}
	if err := copyFile(vmlinuz[0], filepath.Join(out, "vmlinuz")); err != nil {
		return "", err
	}
	for _, m := range Modules {
		found, _ := filepath.Glob(filepath.Join(unpacked, "lib", "modules", "*", "kernel", "drivers", "*", m+".ko"))
		if len(found) != 1 {
			return "", fmt.Errorf("guest: kernel: package %s has %d %s.ko modules, want 1 (compressed modules are not supported)", pkg, len(found), m)
		}
		if err := copyFile(found[0], filepath.Join(out, "modules", m+".ko")); err != nil {
			return "", err
		}
	}
	if err := os.RemoveAll(kdir); err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	if err := os.Rename(out, kdir); err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return "", fmt.Errorf("guest: kernel: %w", err)
	}
	return kdir, nil
}

// complete reports whether kdir holds the kernel and every module.
func complete(kdir string) bool {
	if _, err := os.Stat(filepath.Join(kdir, "vmlinuz")); err != nil {
		return false
	}
	for _, m := range Modules {
		if _, err := os.Stat(filepath.Join(kdir, "modules", m+".ko")); err != nil {
			return false
		}
	}
	return true
}

// buildInitrd returns dir/initrd-<hash of inputs>.cpio.gz, building it when missing.
func buildInitrd(ctx context.Context, dir, root, src, kdir, pkg string) (string, error) {
	busybox, err := os.ReadFile(Busybox)
	if err != nil {
		return "", fmt.Errorf("guest: busybox: %w (install busybox-static)", err)
	}
	if err := checkStatic(Busybox); err != nil {
		return "", err
	}
	goBin, err := goTool()
	if err != nil {
		return "", err
	}
	goVersion, err := run(ctx, root, nil, goBin, "env", "GOVERSION")
	if err != nil {
		return "", fmt.Errorf("guest: %w", err)
	}
	modules := make([][]byte, len(Modules))
	for i, m := range Modules {
		if modules[i], err = os.ReadFile(filepath.Join(kdir, "modules", m+".ko")); err != nil {
			return "", fmt.Errorf("guest: module %s: %w", m, err)
		}
	}

	h := sha256.New()
	field := func(name string, data []byte) { fmt.Fprintf(h, "%s %d\n", name, len(data)); h.Write(data) }
	field("format", []byte("nkp-guest-initrd v1"))
	field("pkg", []byte(pkg))
	field("go", goVersion)
	field("init", initScript)
	field("busybox", busybox)
	for i, m := range Modules {
		field(m, modules[i])
	}
	inputs := []string{filepath.Join(root, "go.mod"), filepath.Join(root, "go.sum")}
	for _, d := range []string{src, filepath.Join(src, "agent")} {
		files, _ := filepath.Glob(filepath.Join(d, "*.go"))
		for _, f := range files {
			if !strings.HasSuffix(f, "_test.go") {
				inputs = append(inputs, f)
			}
		}
	}
	sort.Strings(inputs)
	for _, f := range inputs {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", fmt.Errorf("guest: input %s: %w", f, err)
		}
		rel, _ := filepath.Rel(root, f)
		field(rel, b)
	}
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	initrd := filepath.Join(dir, "initrd-"+sum+".cpio.gz")
	if _, err := os.Stat(initrd); err == nil {
		return initrd, nil
	}

	tmp, err := os.MkdirTemp(dir, ".initrd-")
	if err != nil {
		return "", fmt.Errorf("guest: initramfs: %w", err)
	}
	defer os.RemoveAll(tmp)
	agentBin := filepath.Join(tmp, "agent")
	if _, err := run(ctx, root, []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64"},
		goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", agentBin, "./test/guest/agent"); err != nil {
		return "", fmt.Errorf("guest: agent: %w", err)
	}
	agent, err := os.ReadFile(agentBin)
	if err != nil {
		return "", fmt.Errorf("guest: agent: %w", err)
	}
	if err := checkStatic(agentBin); err != nil {
		return "", err
	}

	if err := writeInitrd(initrd, busybox, agent, modules); err != nil {
		return "", err
	}
	// Older images are garbage now; a VM that is running has read its copy already.
	old, _ := filepath.Glob(filepath.Join(dir, "initrd-*.cpio.gz"))
	for _, o := range old {
		if o != initrd {
			os.Remove(o)
		}
	}
	return initrd, nil
}

// writeInitrd writes the gzip'd cpio archive to path, crash-safely.
func writeInitrd(path string, busybox, agent []byte, modules [][]byte) error {
	f, err := atomicfile.Create(path, 0o644)
	if err != nil {
		return fmt.Errorf("guest: initramfs: %w", err)
	}
	defer f.Abort() // no effect after Commit
	zw, _ := gzip.NewWriterLevel(f, gzip.BestSpeed)
	if err := writeCpio(zw, busybox, agent, modules); err != nil {
		return fmt.Errorf("guest: initramfs %s: %w", path, err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("guest: initramfs %s: %w", path, err)
	}
	if err := f.Commit(); err != nil {
		return fmt.Errorf("guest: initramfs: %w", err)
	}
	return nil
}

func writeCpio(w io.Writer, busybox, agent []byte, modules [][]byte) error {
	c := &cpioWriter{w: w}
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"} {
		if err := c.Dir(d); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console before /init runs, so the node must be in the archive.
	if err := c.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := c.File("bin/busybox", 0o755, busybox); err != nil {
		return err
	}
	if err := c.Symlink("bin/sh", "busybox"); err != nil {
		return err
	}
	if err := c.File("bin/nkp-guest-agent", 0o755, agent); err != nil {
		return err
	}
	for i, m := range Modules {
		if err := c.File("lib/modules/"+m+".ko", 0o644, modules[i]); err != nil {
			return err
		}
	}
	if err := c.File("init", 0o755, initScript); err != nil {
		return err
	}
	return c.Close()
}

// checkStatic refuses a dynamically linked binary: the initramfs has no libc.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("guest: %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("guest: %s is dynamically linked; the initramfs needs a static binary (install busybox-static)", path)
		}
	}
	return nil
}

func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("guest: the go command is not on PATH nor at %s: %w", p, err)
	}
	return p, nil
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("guest: copy %s: %w", from, err)
	}
	f, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("guest: copy to %s: %w", to, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("guest: copy to %s: %w", to, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("guest: copy to %s: %w", to, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("guest: copy to %s: %w", to, err)
	}
	return nil
}
