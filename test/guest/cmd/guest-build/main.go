// Command guest-build builds (or reuses) nkp's tiny test guest and prints where it is,
// as shell-friendly lines: NKP_GUEST_KERNEL=…, NKP_GUEST_INITRD=…, NKP_GUEST_PACKAGE=….
//
//	go run ./test/guest/cmd/guest-build [-dir CACHE]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/nkp-dev/nkp/test/guest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "guest-build:", err)
		os.Exit(1)
	}
}

func run() error {
	def, err := guest.DefaultDir()
	if err != nil {
		return err
	}
	dir := flag.String("dir", def, "cache directory for the kernel and the initramfs")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := guest.Build(ctx, *dir)
	if err != nil {
		return err
	}
	fmt.Printf("NKP_GUEST_KERNEL=%s\nNKP_GUEST_INITRD=%s\nNKP_GUEST_PACKAGE=%s\n", a.Kernel, a.Initrd, a.KernelPackage)
	return nil
}
