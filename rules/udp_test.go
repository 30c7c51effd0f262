package rules

import (
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
)

// TestApplyUDPPlans applies the UDP plan and its UDPBypass variant in a
// throwaway namespace, reads them back with `nft list`, and checks that
// the flows in the udpflows sets (and the bypass sets) survive every switch
// of variant and of ports, that adding UDP to a TCP-only table keeps its
// bypassed flows, and that dropping UDP takes the UDP sets with it.
func TestApplyUDPPlans(t *testing.T) {
	n := newTestNS(t)
	tcpOnly := mustPlan(t, testConfig())
	p := mustPlan(t, udpConfig())
	on := p.UDPBypass(true)

	flows := map[string][]byte{
		bypassSets.name(ipFamilies[0]):  flowKey("192.0.2.1", "192.0.2.2", 40000, 80),
		bypassSets.name(ipFamilies[1]):  flowKey("2001:db8::1", "2001:db8::2", 40001, 443),
		udpFlowSets.name(ipFamilies[0]): flowKey("192.0.2.1", "192.0.2.3", 40002, 53),
		udpFlowSets.name(ipFamilies[1]): flowKey("2001:db8::1", "2001:db8::3", 40003, 4500),
	}
	listed := map[string]string{
		bypassSets.name(ipFamilies[0]):  "192.0.2.1 . 192.0.2.2 . 40000 . 80 ",
		bypassSets.name(ipFamilies[1]):  "2001:db8::1 . 2001:db8::2 . 40001 . 443 ",
		udpFlowSets.name(ipFamilies[0]): "192.0.2.1 . 192.0.2.3 . 40002 . 53 ",
		udpFlowSets.name(ipFamilies[1]): "2001:db8::1 . 2001:db8::3 . 40003 . 4500 ",
	}
	add := func(sets flowSets) {
		t.Helper()
		table := &nftables.Table{Name: "ghostwire", Family: nftables.TableFamilyBridge}
		for _, f := range ipFamilies {
			set := &nftables.Set{Table: table, Name: sets.name(f)}
			if err := n.nft.SetAddElements(set, []nftables.SetElement{{Key: flows[sets.name(f)]}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := n.nft.Flush(); err != nil {
			t.Fatalf("adding flows to the %s sets: %v", sets.prefix, err)
		}
	}
	// apply applies q and checks the listing is q's plus the flows
	// wantBypass and wantUDP say are kept.
	apply := func(q *Plan, wantBypass, wantUDP int) {
		t.Helper()
		if err := q.Apply(n.nft); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		listing := n.ruleset(t)
		if got := bypassElements.ReplaceAllString(listing, ""); got != q.String() {
			t.Fatalf("nft list ruleset (flow set elements removed) differs from plan\n--- got\n%s--- want\n%s", got, q)
		}
		for sets, want := range map[flowSets]int{bypassSets: wantBypass, udpFlowSets: wantUDP} {
			for _, f := range ipFamilies {
				if got := strings.Contains(listing, listed[sets.name(f)]); got != (want > 0) {
					t.Errorf("flow %q in the listing: %v, want %v\n%s", listed[sets.name(f)], got, want > 0, listing)
				}
			}
		}
		if got, err := BypassedFlows(n.nft, "ghostwire"); err != nil || got != wantBypass {
			t.Errorf("BypassedFlows = %d, %v; want %d", got, err, wantBypass)
		}
		if got, err := UDPFlows(n.nft, "ghostwire"); err != nil || got != wantUDP {
			t.Errorf("UDPFlows = %d, %v; want %d", got, err, wantUDP)
		}
		st, err := Tables(n.nft, "ghostwire")
		if err != nil {
			t.Fatal(err)
		}
		if want := (TablesState{Bridge: true, Inet: true, Overload: q.Overload(), UDPBypass: q.IsUDPBypass()}); st != want {
			t.Errorf("Tables = %+v, want %+v", st, want)
		}
		wantNoDrift(t, q, n.nft)
	}

	apply(tcpOnly.Overloaded(OverloadBypass), 0, 0)
	add(bypassSets)
	apply(p, 2, 0) // UDP added in place: the bypassed flows stay
	add(udpFlowSets)
	other := udpConfig()
	other.UDPPorts = []uint16{443}
	other.ProxyUDPPort = 9877
	other.UDPSessionTimeout = 5 * time.Minute
	changed := mustPlan(t, other)
	for _, q := range []*Plan{on, p, on.Overloaded(OverloadRefuse), on.Draining(), p.Draining(), changed.UDPBypass(true), changed, on} {
		apply(q, 2, 2)
	}
	if got := n.run(t, "nft", "list", "set", "bridge", "ghostwire", "udpflows4"); !strings.Contains(got, "\t\ttimeout 1m\n") {
		t.Errorf("udpflows4 timeout not back to 1m:\n%s", got)
	}
	apply(tcpOnly, 2, 0) // UDP dropped: its sets go, the bypass sets stay
	if got := n.ruleset(t); strings.Contains(got, "udp") {
		t.Errorf("a TCP-only plan left UDP in the tables:\n%s", got)
	}
	apply(on, 2, 0)
}
