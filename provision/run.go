package provision

import (
	"errors"

	"github.com/urfave/cli/v2"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:  "run",
		Usage: "run the transparent proxy; it owns the diversion while it lives",
		Action: func(c *cli.Context) error {
			return errors.New("run: not built yet")
		},
	}
}
