package main

import (
	"net/netip"
	"testing"

	"github.com/ghostwire/ghostwire/provision"
	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

func TestProxyStatus(t *testing.T) {
	st := proxy.Stats{
		Active: 2, UDPSessions: 1, Accepted: 40, UDPSessionsTotal: 3, BytesUp: 1536, BytesDown: 3 << 20, PolicyDenied: 4,
		TopClients: []proxy.Talker{{Addr: netip.MustParseAddr("192.0.2.1"), Bytes: 2 << 20}, {Addr: netip.MustParseAddr("192.0.2.3"), Bytes: 900}},
		TopServers: []proxy.Talker{{Addr: netip.MustParseAddr("2001:db8::2"), Bytes: 5 << 30}},
	}
	want := "proxy: 2 connections open, 1 udp sessions\n" +
		"since start: 40 connections accepted, 3 udp sessions, 1.5 KiB up, 3.0 MiB down, 4 denied by name\n" +
		"busiest clients: 192.0.2.1 (2.0 MiB), 192.0.2.3 (900 B)\n" +
		"busiest servers: 2001:db8::2 (5.0 GiB)\n"
	if got := proxyStatus(st); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestRuleStatus(t *testing.T) {
	got := ruleStatus([]rules.RuleCounter{
		{Table: "bridge", Rule: "lift tcp client", Packets: 109, Bytes: 9000},
		{Table: "bridge", Rule: "bypass flow client4"},
		{Table: "inet", Rule: "tcp syn", Packets: 23, Bytes: 1380},
	})
	want := "rules that matched (packets, bytes):\n" +
		"  bridge lift tcp client                     109    8.8 KiB\n" +
		"  inet   tcp syn                              23    1.3 KiB\n"
	if got != want {
		t.Errorf("got\n%q\nwant\n%q", got, want)
	}
	if ruleStatus(nil) != "" {
		t.Error("no counters should print nothing")
	}
}

// Scripts tell the states apart by the exit status alone.
func TestStatusExit(t *testing.T) {
	for mode, want := range map[provision.Mode]int{
		provision.Intercepting: 0, provision.OverloadedBypass: 3, provision.OverloadedRefuse: 3,
		provision.Diverting: 3, provision.Bypassing: 3, provision.NotProvisioned: 4,
	} {
		got := 0
		if err := statusExit(mode); err != nil {
			got = int(err.(exitCode))
		}
		if got != want {
			t.Errorf("%s: exit %d, want %d", mode, got, want)
		}
	}
}
