// Command nkp-hostd is nkp's host daemon: `nkp-hostd join|serve`. See package
// github.com/nkp-dev/nkp/hostd/cli and github.com/nkp-dev/nkp/hostd.
package main

import (
	"fmt"
	"os"

	"github.com/nkp-dev/nkp/hostd/cli"
)

func main() {
	if err := cli.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "nkp-hostd:", err)
		os.Exit(1)
	}
}
