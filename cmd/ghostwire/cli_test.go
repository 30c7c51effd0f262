package main

import (
	"strings"
	"testing"
)

// Every command takes -c/--config and --state-file, as operators and the
// systemd units type them; apply keeps --dry-run and --no-diversion, run --json.
func TestCommandsAndFlags(t *testing.T) {
	want := map[string][]string{
		"plan":     {"config", "state-file"},
		"apply":    {"config", "state-file", "dry-run", "no-diversion"},
		"teardown": {"config", "state-file"},
		"status":   {"config", "state-file"},
		"run":      {"config", "state-file", "json"},
	}
	a := app()
	if len(a.Commands) != len(want) {
		t.Errorf("%d commands, want %d", len(a.Commands), len(want))
	}
	for _, c := range a.Commands {
		var names []string
		for _, f := range c.Flags {
			names = append(names, f.Names()...)
		}
		got := strings.Join(names, ",")
		exp := strings.Join(want[c.Name], ",")
		exp = strings.Replace(exp, "config", "config,c", 1)
		if got != exp {
			t.Errorf("%s flags = %s, want %s", c.Name, got, exp)
		}
	}
}

func TestUnexpectedArguments(t *testing.T) {
	err := app().Run([]string{"ghostwire", "status", "-c", "x.yaml", "extra"})
	if err == nil || err.Error() != "unexpected arguments: [extra]" {
		t.Errorf("err = %v", err)
	}
}
