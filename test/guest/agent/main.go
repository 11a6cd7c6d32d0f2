// Command nkp-guest-agent is the program the tiny test guest runs as its only job. It is
// built statically (CGO_ENABLED=0) by guest.Build into the guest's initramfs; the guest's
// /init runs it and powers off afterwards. It reads the nkp.* parameters from
// /proc/cmdline (see guest.Config), talks to the guest's TPM through /dev/tpmrm0 (or
// /dev/tpm0), writes and reads marker blocks on its virtio disks (/dev/vdX, O_DIRECT)
// and prints its results as "NKP-GUEST key=value" lines on the console.
//
// Nothing imports it; the host side of the protocol is package guest.
package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/test/guest"
)

func main() {
	os.Exit(run())
}

func run() int {
	out := os.Stdout
	report := func(err error) int {
		fmt.Fprintln(out, guest.FormatRecord("error", err.Error()))
		fmt.Fprintln(out, guest.FormatRecord("done", "fail"))
		return 1
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return report(fmt.Errorf("read kernel command line: %w", err))
	}
	cfg, err := guest.ParseArgs(string(cmdline))
	if err != nil {
		return report(err)
	}
	a := &agent{out: out, sysfs: "/sys/class/tpm/tpm0", eventLog: guest.EventLogPath, efi: "/sys/firmware/efi", sleep: time.Sleep, openDisk: openDevice}
	wait := 10 * time.Second
	if !cfg.NeedsTPM() {
		wait = 2 * time.Second // a TPM is optional here: its driver probes well within this
	}
	tpm, dev, err := openTPM([]string{"/dev/tpmrm0", "/dev/tpm0"}, wait)
	switch {
	case err == nil:
		defer tpm.Close()
		a.tpm = tpm
		fmt.Fprintln(out, guest.FormatRecord("tpm-device", dev))
	case cfg.NeedsTPM():
		return report(err)
	default: // a disk-only job runs without a TPM
		fmt.Fprintln(out, guest.FormatRecord("tpm-device", "none"))
	}
	if err := a.run(cfg); err != nil {
		return report(err)
	}
	fmt.Fprintln(out, guest.FormatRecord("done", "ok"))
	return 0
}

// openDevice opens /dev/DEV with O_DIRECT and O_SYNC, waiting up to 10 s for the node to
// appear (virtio_blk probes its disks after insmod returns).
func openDevice(dev string) (*os.File, error) {
	path := "/dev/" + dev
	deadline := time.Now().Add(10 * time.Second)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT|unix.O_SYNC, 0)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return nil, fmt.Errorf("open disk %s: %w (does the VM have a virtio disk %s?)", path, err, dev)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// openTPM opens the first TPM device that exists, waiting up to timeout for one to appear
// (the kernel's TPM drivers are built in, so it normally exists when /init runs).
func openTPM(paths []string, timeout time.Duration) (transport.TPMCloser, string, error) {
	deadline := time.Now().Add(timeout)
	for {
		for _, p := range paths {
			if _, err := os.Stat(p); err != nil {
				continue
			}
			t, err := linuxtpm.Open(p)
			if err != nil {
				return nil, "", fmt.Errorf("open TPM %s: %w", p, err)
			}
			return t, p, nil
		}
		if time.Now().After(deadline) {
			return nil, "", fmt.Errorf("no TPM device among %v after %v: the VM has no TPM, or its backend did not answer", paths, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
