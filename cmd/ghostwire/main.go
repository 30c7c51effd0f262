// Command ghostwire provisions a two-NIC Linux box as an invisible bridge and runs its transparent proxy.
package main

import (
	"errors"
	"fmt"
	"os"
)

func main() {
	err := app().Run(os.Args)
	var code exitCode
	switch {
	case errors.As(err, &code):
		os.Exit(int(code)) // a state said in the output, not an error
	case err != nil:
		fmt.Fprintf(os.Stderr, "ghostwire: %v\n", err)
		os.Exit(1)
	}
}

// exitCode ends the command with that status and no message: status's
// way of telling its states apart to scripts.
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("exit status %d", int(c)) }
