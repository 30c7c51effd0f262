// Package provision is ghostwire's command line: plan, apply, teardown, status and run.
package provision

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/ghostwire/ghostwire/appliance"
)

var configFlag = &cli.StringFlag{
	Name:    "config",
	Aliases: []string{"c"},
	Usage:   "YAML config file",
	EnvVars: []string{"GHOSTWIRE_CONFIG"},
}

var stateFlag = &cli.StringFlag{
	Name:  "state-file",
	Usage: "where apply records what it changed (overrides state_file)",
}

// App is the ghostwire command.
func App() *cli.App {
	return &cli.App{
		Name:  "ghostwire",
		Usage: "bridge-mode inline transparent proxy",
		Description: "Bridges two NICs as one invisible bump in the wire and diverts selected\n" +
			"TCP flows to a transparent proxy that connects onward as the client.",
		HideHelpCommand: true,
		Commands: []*cli.Command{
			{
				Name:  "plan",
				Usage: "print everything apply would do (nftables ruleset, links, sysctls, ip rules and routes); change nothing",
				Flags: commonFlags(),
				Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *appliance.Box) error {
					p, err := b.Plan(cfg)
					if err != nil {
						return err
					}
					fmt.Fprint(c.App.Writer, p)
					return nil
				}),
			},
			{
				Name:  "apply",
				Usage: "provision the box: bridge, sysctls, policy routing and the nftables diversion; safe to repeat",
				Flags: commonFlags(
					&cli.BoolFlag{Name: "dry-run", Usage: "print the plan instead of applying it"},
					&cli.BoolFlag{Name: "no-diversion", Usage: "leave the nftables diversion to `ghostwire run`, so it exists only while a proxy lives"},
				),
				Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *appliance.Box) error {
					if c.Bool("dry-run") {
						p, err := b.Plan(cfg)
						if err != nil {
							return err
						}
						fmt.Fprint(c.App.Writer, p)
						return nil
					}
					if err := b.Apply(cfg, appliance.ApplyOptions{NoDiversion: c.Bool("no-diversion")}); err != nil {
						return fmt.Errorf("apply: %w", err)
					}
					fmt.Fprintf(c.App.Writer, "applied: %s over %s and %s\n", cfg.Bridge.Name, cfg.Bridge.ClientNIC, cfg.Bridge.ServerNIC)
					return nil
				}),
			},
			{
				Name:  "teardown",
				Usage: "remove what apply created and restore what it changed; safe to repeat",
				Flags: commonFlags(),
				Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *appliance.Box) error {
					if err := b.Teardown(cfg); err != nil {
						return fmt.Errorf("teardown: %w", err)
					}
					fmt.Fprintln(c.App.Writer, "torn down")
					return nil
				}),
			},
			{
				Name:  "status",
				Usage: "say whether the box is intercepting, bypassing or not provisioned, and what drifted",
				Flags: commonFlags(),
				Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *appliance.Box) error {
					s, err := b.Status(cfg)
					if err != nil {
						return err
					}
					fmt.Fprint(c.App.Writer, s)
					return nil
				}),
			},
			runCommand(),
		},
	}
}

// commonFlags go on every command so that `ghostwire plan -c FILE` reads
// the way operators type it.
func commonFlags(extra ...cli.Flag) []cli.Flag {
	return append([]cli.Flag{configFlag, stateFlag}, extra...)
}

// loadConfig reads the config named by --config plus flag overrides.
func loadConfig(c *cli.Context) (*appliance.Config, error) {
	over := map[string]any{}
	if c.IsSet(stateFlag.Name) {
		over["state_file"] = c.String(stateFlag.Name)
	}
	return appliance.Load(c.String(configFlag.Name), over)
}

func withBox(f func(*cli.Context, *appliance.Config, *appliance.Box) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		if c.Args().Present() {
			return fmt.Errorf("unexpected arguments: %v", c.Args().Slice())
		}
		cfg, err := loadConfig(c)
		if err != nil {
			return err
		}
		b, err := appliance.OpenBox()
		if err != nil {
			return err
		}
		defer b.Close()
		return f(c, cfg, b)
	}
}
