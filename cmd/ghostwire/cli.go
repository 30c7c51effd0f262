package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/ghostwire/ghostwire/appliance"
	"github.com/ghostwire/ghostwire/provision"
)

// The flags every command takes (see commonFlags).
const (
	configFlag = "config"
	stateFlag  = "state-file"
)

// app is the ghostwire command.
func app() *cli.App {
	return &cli.App{
		Name:  "ghostwire",
		Usage: "bridge-mode inline transparent proxy",
		Description: "Bridges two NICs as one invisible bump in the wire and diverts selected\n" +
			"TCP flows to a transparent proxy that connects onward as the client.",
		HideHelpCommand: true,
		Commands:        []*cli.Command{planCommand(), applyCommand(), teardownCommand(), statusCommand(), runCommand(), bypassCommand(), checkCommand()},
	}
}

func planCommand() *cli.Command {
	return &cli.Command{
		Name:   "plan",
		Usage:  "print everything apply would do (nftables ruleset, links, sysctls, ip rules and routes); change nothing",
		Flags:  commonFlags(),
		Action: withBox(printPlan),
	}
}

func applyCommand() *cli.Command {
	return &cli.Command{
		Name:  "apply",
		Usage: "provision the box: bridge, sysctls, policy routing and the nftables diversion; safe to repeat",
		Flags: commonFlags(
			&cli.BoolFlag{Name: "dry-run", Usage: "print the plan instead of applying it"},
			&cli.BoolFlag{Name: "no-diversion", Usage: "leave the nftables diversion to `ghostwire run`, so it exists only while a proxy lives"},
		),
		Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *provision.Box) error {
			if c.Bool("dry-run") {
				return printPlan(c, cfg, b)
			}
			if err := appliance.Apply(b, cfg, provision.ApplyOptions{NoDiversion: c.Bool("no-diversion")}); err != nil {
				return fmt.Errorf("apply: %w", err)
			}
			fmt.Fprintf(c.App.Writer, "applied: %s over %s and %s\n", cfg.Bridge.Name, cfg.Bridge.ClientNIC, cfg.Bridge.ServerNIC)
			return nil
		}),
	}
}

func teardownCommand() *cli.Command {
	return &cli.Command{
		Name:  "teardown",
		Usage: "remove what apply created and restore what it changed; safe to repeat",
		Flags: commonFlags(),
		Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *provision.Box) error {
			if err := appliance.Teardown(b, cfg); err != nil {
				return fmt.Errorf("teardown: %w", err)
			}
			fmt.Fprintln(c.App.Writer, "torn down")
			return nil
		}),
	}
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "say whether the box is intercepting, bypassing or not provisioned, and what drifted",
		Description: "Exit status: 0 intercepting; 3 bypassing, diverting without the proxy, or overloaded\n" +
			"(new flows are not proxied); 4 not provisioned; 1 the box could not be read.",
		Flags: commonFlags(&cli.BoolFlag{Name: "json", Usage: "print a JSON document, with the running proxy's counters"}),
		Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *provision.Box) error {
			s, err := appliance.Status(b, cfg)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				if err := printStatusJSON(c, cfg, s); err != nil {
					return err
				}
			} else {
				fmt.Fprint(c.App.Writer, s)
				printProxyStatus(c.App.Writer, cfg)
			}
			return statusExit(s.Mode)
		}),
	}
}

// printPlan is `plan` and `apply --dry-run`.
func printPlan(c *cli.Context, cfg *appliance.Config, b *provision.Box) error {
	d, err := appliance.Plan(b, cfg)
	if err != nil {
		return err
	}
	fmt.Fprint(c.App.Writer, d)
	return nil
}

// commonFlags go on every command so that `ghostwire plan -c FILE` reads
// the way operators type it.
// Each command gets its own flag values: urfave/cli records in them
// whether they were set.
func commonFlags(extra ...cli.Flag) []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: configFlag, Aliases: []string{"c"}, Usage: "YAML config file", EnvVars: []string{"GHOSTWIRE_CONFIG"}},
		&cli.StringFlag{Name: stateFlag, Usage: "where apply records what it changed (overrides state_file)"},
	}, extra...)
}

// overrides are the config keys set by flags.
func overrides(c *cli.Context) map[string]any {
	over := map[string]any{}
	if c.IsSet(stateFlag) {
		over["state_file"] = c.String(stateFlag)
	}
	return over
}

// withBox loads the config and opens the kernel's handles for f.
func withBox(f func(*cli.Context, *appliance.Config, *provision.Box) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		if c.Args().Present() {
			return fmt.Errorf("unexpected arguments: %v", c.Args().Slice())
		}
		cfg, err := appliance.Load(c.String(configFlag), overrides(c))
		if err != nil {
			return err
		}
		b, err := provision.Open()
		if err != nil {
			return err
		}
		defer b.Close()
		return f(c, cfg, b)
	}
}
