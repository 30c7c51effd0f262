package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/ghostwire/ghostwire/appliance"
	"github.com/ghostwire/ghostwire/provision"
)

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:  "check",
		Usage: "diagnose the box (changes nothing): one line per check, OK, WARN or FAIL, with the fix",
		Description: "Exit status: 0 all OK; 1 warnings; 2 failures; 1 also when the box could not be read (message on stderr).\n" +
			"Each line: STATUS CHECK: what was found; fix: the command or config key that fixes it.",
		Flags: commonFlags(&cli.BoolFlag{Name: "json", Usage: "print the results as a JSON array"}),
		Action: withBox(func(c *cli.Context, cfg *appliance.Config, b *provision.Box) error {
			rs, err := appliance.Check(b, cfg)
			if err != nil {
				return err
			}
			return printCheck(c, rs)
		}),
	}
}

// printCheck prints rs as text or JSON and returns the exit status.
func printCheck(c *cli.Context, rs []provision.Result) error {
	if c.Bool("json") {
		js, err := provision.ResultsJSON(rs)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "%s\n", js)
	} else {
		fmt.Fprint(c.App.Writer, provision.FormatResults(rs))
	}
	if code := provision.ExitStatus(rs); code != 0 {
		return exitCode(code)
	}
	return nil
}
