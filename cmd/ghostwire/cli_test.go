package main

import (
	"path/filepath"
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
		"status":   {"config", "state-file", "json"},
		"run":      {"config", "state-file", "json"},
		"bypass":   nil,
		"check":    {"config", "state-file", "json"},
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
	// bypass add|del|list take the common flags; add --for.
	for _, c := range a.Command("bypass").Subcommands {
		var names []string
		for _, f := range c.Flags {
			names = append(names, f.Names()...)
		}
		exp := map[string]string{"add": "config,c,state-file,for", "del": "config,c,state-file", "list": "config,c,state-file"}[c.Name]
		if got := strings.Join(names, ","); got != exp {
			t.Errorf("bypass %s flags = %s, want %s", c.Name, got, exp)
		}
	}
}

// With no daemon, bypass commands say so and fail.
func TestBypassNotRunning(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "control.sock")
	t.Setenv("GHOSTWIRE_CONTROL_SOCKET", sock)
	t.Setenv("GHOSTWIRE_BRIDGE_CLIENT_NIC", "eth1")
	t.Setenv("GHOSTWIRE_BRIDGE_SERVER_NIC", "eth2")
	for _, args := range [][]string{{"add", "192.0.2.9"}, {"del", "192.0.2.9"}, {"list"}} {
		err := app().Run(append([]string{"ghostwire", "bypass"}, args...))
		want := "ghostwire run is not running (no control socket at " + sock + "): nothing changed"
		if err == nil || err.Error() != want {
			t.Errorf("bypass %v: %v, want %q", args, err, want)
		}
	}
	if err := app().Run([]string{"ghostwire", "bypass", "add"}); err == nil || !strings.Contains(err.Error(), "want one ADDR[/LEN]") {
		t.Errorf("bypass add without an address: %v", err)
	}
}

func TestUnexpectedArguments(t *testing.T) {
	err := app().Run([]string{"ghostwire", "status", "-c", "x.yaml", "extra"})
	if err == nil || err.Error() != "unexpected arguments: [extra]" {
		t.Errorf("err = %v", err)
	}
}
