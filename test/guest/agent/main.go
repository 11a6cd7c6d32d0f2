// Command nkp-guest-agent is the program the tiny test guest runs as its only job. It is
// built statically (CGO_ENABLED=0) by guest.Build into the guest's initramfs; the guest's
// /init runs it and powers off afterwards. It reads the nkp.* parameters from
// /proc/cmdline (see guest.Config), talks to the guest's TPM through /dev/tpmrm0 (or
// /dev/tpm0) and prints its results as "NKP-GUEST key=value" lines on the console.
//
// Nothing imports it; the host side of the protocol is package guest.
package main

import (
	"fmt"
	"os"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

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
	tpm, dev, err := openTPM([]string{"/dev/tpmrm0", "/dev/tpm0"}, 10*time.Second)
	if err != nil {
		return report(err)
	}
	defer tpm.Close()
	fmt.Fprintln(out, guest.FormatRecord("tpm-device", dev))
	a := &agent{out: out, tpm: tpm, sysfs: "/sys/class/tpm/tpm0", sleep: time.Sleep}
	if err := a.run(cfg); err != nil {
		return report(err)
	}
	fmt.Fprintln(out, guest.FormatRecord("done", "ok"))
	return 0
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
