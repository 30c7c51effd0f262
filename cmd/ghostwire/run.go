package main

import (
	"log/slog"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/ghostwire/ghostwire/appliance"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:  "run",
		Usage: "run the transparent proxy; it owns the diversion while it lives (SIGHUP reloads, SIGTERM drains)",
		Flags: commonFlags(
			&cli.BoolFlag{Name: "json", Usage: "log as JSON lines whatever log.format says"},
		),
		Action: func(c *cli.Context) error {
			r := &appliance.Runner{Path: c.String(configFlag), Overrides: overrides(c), Level: new(slog.LevelVar), Out: os.Stderr, JSON: c.Bool("json")}
			return r.Run(c.Context)
		},
	}
}
