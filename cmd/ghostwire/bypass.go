package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/ghostwire/ghostwire/appliance"
	"github.com/ghostwire/ghostwire/provision"
	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// bypassCommand is `ghostwire bypass add|del|list`: the live bypass list
// of the running `ghostwire run`, through its control socket.
func bypassCommand() *cli.Command {
	return &cli.Command{
		Name:  "bypass",
		Usage: "hosts whose new connections cross the bridge untouched, changed live (needs ghostwire run)",
		Subcommands: []*cli.Command{
			{
				Name:      "add",
				Usage:     "bridge new connections from or to ADDR[/LEN] untouched (established ones stay proxied)",
				ArgsUsage: "ADDR[/LEN]",
				Flags:     commonFlags(&cli.DurationFlag{Name: "for", Usage: "remove the entry by itself after `DURATION` (default: permanent)"}),
				Action: withControl(1, func(c *cli.Context, path string) error {
					req := appliance.ControlRequest{Cmd: "bypass-add", Prefix: c.Args().First()}
					if c.IsSet("for") {
						req.For = c.Duration("for").String()
					}
					r, err := control(path, req)
					if err != nil {
						return err
					}
					for _, e := range r.Entries {
						fmt.Fprintf(c.App.Writer, "added %s\n", entryLine(e))
					}
					return nil
				}),
			},
			{
				Name:      "del",
				Usage:     "proxy new connections from or to ADDR[/LEN] again",
				ArgsUsage: "ADDR[/LEN]",
				Flags:     commonFlags(),
				Action: withControl(1, func(c *cli.Context, path string) error {
					if _, err := control(path, appliance.ControlRequest{Cmd: "bypass-del", Prefix: c.Args().First()}); err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "deleted %s\n", c.Args().First())
					return nil
				}),
			},
			{
				Name:  "list",
				Usage: "print the bypass list, one entry a line",
				Flags: commonFlags(),
				Action: withControl(0, func(c *cli.Context, path string) error {
					r, err := control(path, appliance.ControlRequest{Cmd: "bypass-list"})
					if err != nil {
						return err
					}
					for _, e := range r.Entries {
						fmt.Fprintln(c.App.Writer, entryLine(e))
					}
					return nil
				}),
			},
		},
	}
}

// entryLine is "PREFIX until TIME" or "PREFIX permanent".
func entryLine(e appliance.BypassEntry) string {
	if e.Expires == "" {
		return e.Prefix + " permanent"
	}
	if t, err := time.Parse(time.RFC3339, e.Expires); err == nil {
		return e.Prefix + " until " + t.Local().Format(time.RFC3339)
	}
	return e.Prefix + " until " + e.Expires
}

// withControl loads the config for its control_socket and runs f with
// exactly nargs arguments.
func withControl(nargs int, f func(*cli.Context, string) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		if c.NArg() != nargs {
			if nargs == 0 {
				return fmt.Errorf("unexpected arguments: %v", c.Args().Slice())
			}
			return fmt.Errorf("want one ADDR[/LEN], got %d arguments", c.NArg())
		}
		cfg, err := appliance.Load(c.String(configFlag), overrides(c))
		if err != nil {
			return err
		}
		return f(c, cfg.ControlSocket)
	}
}

// control sends req; the daemon's refusal is an error.
func control(path string, req appliance.ControlRequest) (appliance.ControlResponse, error) {
	r, err := appliance.Control(path, req)
	if errors.Is(err, appliance.ErrNotRunning) {
		return r, fmt.Errorf("ghostwire run is not running (no control socket at %s): nothing changed", path)
	}
	if err != nil {
		return r, err
	}
	if !r.OK {
		return r, fmt.Errorf("%s: %s", req.Cmd, r.Error)
	}
	return r, nil
}

// statusJSON is `ghostwire status --json`: the status fields, and the
// running proxy's counters and bypass list when its control socket answers.
type statusJSON struct {
	Mode          provision.Mode          `json:"mode"`
	Tables        any                     `json:"tables"`
	Drift         []string                `json:"drift"`
	BypassedFlows int                     `json:"bypassed_flows"`
	UDP           bool                    `json:"udp"`
	UDPFlows      int                     `json:"udp_flows"`
	Proxy         *proxy.Stats            `json:"proxy"`  // null: no control socket answers
	Bypass        []appliance.BypassEntry `json:"bypass"` // the live bypass list (null with no proxy)
	Rules         []rules.RuleCounter     `json:"rules"`  // every rule's counters (null with no tables)
}

func printStatusJSON(c *cli.Context, cfg *appliance.Config, s *provision.Status) error {
	doc := statusJSON{Mode: s.Mode, Tables: s.Tables, Drift: s.Drift, BypassedFlows: s.BypassedFlows, UDP: s.UDP, UDPFlows: s.UDPFlows}
	if doc.Drift == nil {
		doc.Drift = []string{}
	}
	if r, err := appliance.Control(cfg.ControlSocket, appliance.ControlRequest{Cmd: "stats"}); err == nil && r.OK {
		doc.Proxy = r.Stats
		if r, err := appliance.Control(cfg.ControlSocket, appliance.ControlRequest{Cmd: "bypass-list"}); err == nil && r.OK {
			doc.Bypass = r.Entries
			if doc.Bypass == nil {
				doc.Bypass = []appliance.BypassEntry{}
			}
		}
	}
	doc.Rules = ruleCounters()
	enc := json.NewEncoder(c.App.Writer)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}
