// Command ghostwire provisions a two-NIC Linux box as an invisible bridge and runs its transparent proxy.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := app().Run(os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "ghostwire: %v\n", err)
		os.Exit(1)
	}
}
