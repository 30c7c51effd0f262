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
			&cli.BoolFlag{Name: "json", Usage: "log as JSON lines instead of text"},
		),
		Action: func(c *cli.Context) error {
			lvl := new(slog.LevelVar)
			opts := &slog.HandlerOptions{Level: lvl}
			var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
			if c.Bool("json") {
				h = slog.NewJSONHandler(os.Stderr, opts)
			}
			r := &appliance.Runner{Path: c.String(configFlag), Overrides: overrides(c), Level: lvl, Logger: slog.New(h)}
			return r.Run(c.Context)
		},
	}
}
