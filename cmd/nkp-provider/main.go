// Command nkp-provider is the cluster's key provider daemon: `nkp-provider init|serve`.
// See package github.com/nkp-dev/nkp/provider/cli.
package main

import (
	"fmt"
	"os"

	"github.com/nkp-dev/nkp/provider/cli"
)

func main() {
	if err := cli.Main(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "nkp-provider:", err)
		os.Exit(1)
	}
}
