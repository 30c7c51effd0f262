package rules

import (
	"net/netip"
	"regexp"
	"testing"
)

// flowElements matches the elements nft lists in a flow set (each with
// its "expires"), which Plan.String never prints.
var flowElements = regexp.MustCompile(`(?s)\t\telements = \{ [^}]*expires[^}]*\}\n`)

// TestSelectionReloadKeepsFlows applies plans whose selection changes
// (lists added, one added before others, emptied, UDP added and dropped
// around them) over tables whose flow sets hold flows: every apply lists
// as its plan, with no drift, and the bypassed flows stay (the udpflows
// ones too, while UDP stays).
func TestSelectionReloadKeepsFlows(t *testing.T) {
	n := newTestNS(t)
	udp := udpConfig()
	withSel := func(cfg Config, clients, xclients, xservers []netip.Prefix) Config {
		cfg.ClientCIDRs, cfg.ExcludeClientCIDRs, cfg.ExcludeServerCIDRs = clients, xclients, xservers
		return cfg
	}
	tcpOnly := testConfig()
	steps := []struct {
		name string
		cfg  Config
	}{
		{"udp, no selection", udp},
		{"clients", withSel(udp, pfx("192.0.2.0/24", "2001:db8::/32"), nil, nil)},
		{"clients and servers excluded", withSel(udp, pfx("192.0.2.0/24", "2001:db8::/32"), nil, pfx("203.0.113.0/24"))},
		// xclients4 comes before xservers4, which exists: it is made again.
		{"a list before another", withSel(udp, pfx("192.0.2.0/24"), pfx("192.0.2.3/32"), pfx("203.0.113.0/24", "2001:db8:ff::/48"))},
		{"lists changed", withSel(udp, pfx("192.0.2.0/25", "198.51.100.0/24"), pfx("192.0.2.4/32"), nil)},
		{"udp dropped", withSel(tcpOnly, pfx("192.0.2.0/25"), pfx("192.0.2.4/32"), nil)},
		// The UDP sets come before the selection's, which are made again.
		{"udp added back", withSel(udp, pfx("192.0.2.0/25"), pfx("192.0.2.4/32"), nil)},
		{"no selection", udp},
	}
	hasUDP := true
	for i, step := range steps {
		p := mustPlan(t, step.cfg)
		if err := p.Apply(n.nft); err != nil {
			t.Fatalf("%s: Apply: %v", step.name, err)
		}
		if i == 0 {
			n.run(t, "nft", "add element bridge ghostwire bypass4 { 192.0.2.1 . 198.51.100.1 . 40000 . 80 }; "+
				"add element bridge ghostwire bypass6 { 2001:db8::1 . 2001:db8:1::1 . 40000 . 443 }; "+
				"add element bridge ghostwire udpflows4 { 192.0.2.1 . 198.51.100.1 . 40000 . 53 }")
		}
		if got := flowElements.ReplaceAllString(n.ruleset(t), ""); got != p.String() {
			t.Fatalf("%s: listing differs from plan\n--- got\n%s--- want\n%s", step.name, got, p)
		}
		wantNoDrift(t, p, n.nft)
		if got, err := BypassedFlows(n.nft, "ghostwire"); err != nil || got != 2 {
			t.Errorf("%s: %d bypassed flows (%v), want 2 kept", step.name, got, err)
		}
		wantUDP := 0
		if len(step.cfg.UDPPorts) > 0 && hasUDP {
			wantUDP = 1
		}
		hasUDP = hasUDP && len(step.cfg.UDPPorts) > 0
		if got, err := UDPFlows(n.nft, "ghostwire"); err != nil || got != wantUDP {
			t.Errorf("%s: %d UDP flows (%v), want %d", step.name, got, err, wantUDP)
		}
	}

	// The selection's rules read as no variant.
	p := mustPlan(t, selectionConfig())
	p.cfg.UDPPorts, p.cfg.ProxyUDPPort = []uint16{53}, 3130
	p = newPlan(p.cfg, variant{})
	for _, tc := range []struct {
		p    *Plan
		want TablesState
	}{
		{p, TablesState{Bridge: true, Inet: true}},
		{p.Overloaded(OverloadBypass), TablesState{Bridge: true, Inet: true, Overload: OverloadBypass}},
		{p.Overloaded(OverloadRefuse), TablesState{Bridge: true, Inet: true, Overload: OverloadRefuse}},
		{p.UDPBypass(true), TablesState{Bridge: true, Inet: true, UDPBypass: true}},
	} {
		if err := tc.p.Apply(n.nft); err != nil {
			t.Fatal(err)
		}
		if st, err := Tables(n.nft, "ghostwire"); err != nil || st != tc.want {
			t.Errorf("Tables = %+v, %v; want %+v", st, err, tc.want)
		}
	}
}
