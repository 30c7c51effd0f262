package rules

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
)

func TestParseOverload(t *testing.T) {
	for _, o := range []Overload{OverloadBypass, OverloadRefuse} {
		got, err := ParseOverload(o.String())
		if err != nil || got != o {
			t.Errorf("ParseOverload(%q) = %v, %v; want %v", o.String(), got, err, o)
		}
	}
	for _, s := range []string{"", "none", "Bypass", "drop", " refuse"} {
		_, err := ParseOverload(s)
		if err == nil || !strings.Contains(err.Error(), "overload mode \""+s+"\"") {
			t.Errorf("ParseOverload(%q) = %v; want an error naming the value", s, err)
		}
	}
	if got := Overload(7).String(); got != "Overload(7)" {
		t.Errorf("Overload(7).String() = %q", got)
	}
	if OverloadNone.String() != "none" {
		t.Errorf("OverloadNone.String() = %q", OverloadNone.String())
	}
}

// The variants: normal, draining, bypass, refuse. Draining wins over overload.
func TestOverloadedVariants(t *testing.T) {
	p := mustPlan(t, testConfig())
	bypass, refuse := p.Overloaded(OverloadBypass), p.Overloaded(OverloadRefuse)
	for _, tt := range []struct {
		name     string
		p        *Plan
		overload Overload
		draining bool
	}{
		{"normal", p, OverloadNone, false},
		{"bypass", bypass, OverloadBypass, false},
		{"refuse", refuse, OverloadRefuse, false},
		{"bypass then none", bypass.Overloaded(OverloadNone), OverloadNone, false},
		{"bypass then refuse", bypass.Overloaded(OverloadRefuse), OverloadRefuse, false},
		{"draining an overloaded plan", refuse.Draining(), OverloadNone, true},
		{"overloading a draining plan", p.Draining().Overloaded(OverloadBypass), OverloadNone, true},
	} {
		if tt.p.Overload() != tt.overload || tt.p.IsDraining() != tt.draining {
			t.Errorf("%s: Overload() = %v, IsDraining() = %v; want %v, %v",
				tt.name, tt.p.Overload(), tt.p.IsDraining(), tt.overload, tt.draining)
		}
	}
	if got, want := bypass.Overloaded(OverloadNone).String(), p.String(); got != want {
		t.Errorf("Overloaded(OverloadNone) does not render as the normal plan:\n%s", got)
	}
	if got, want := refuse.Draining().String(), p.Draining().String(); got != want {
		t.Errorf("Draining of an overloaded plan does not render as the draining plan:\n%s", got)
	}
	// Every variant has the bypass sets and lookups; only bypass adds
	// every SYN to them (the live bypass list's rules add a listed
	// host's, after a lookup).
	for _, q := range []*Plan{p, p.Draining(), bypass, refuse} {
		s := q.String()
		if strings.Count(s, "\tset bypass") != 4 || strings.Count(s, " @bypass4 counter packets 0 bytes 0 update @bypass4 ") != 1 {
			t.Errorf("%v plan lacks the bypass sets or lookups:\n%s", q.Overload(), s)
		}
		if got := strings.Contains(s, "fin,syn,rst,ack counter packets 0 bytes 0 add @bypass"); got != (q == bypass) {
			t.Errorf("%v plan: add to bypass set present = %v", q.Overload(), got)
		}
		if got := strings.Contains(s, "fin,syn,rst,ack counter packets 0 bytes 0 reject with tcp reset comment"); got != (q == refuse) {
			t.Errorf("%v plan: SYN reject present = %v", q.Overload(), got)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("Overloaded(Overload(3)) did not panic")
		}
	}()
	p.Overloaded(Overload(3))
}

// UDPBypass is a switch of its own: the TCP variants keep it and it keeps
// theirs; a plan without UDP ports ignores it; it changes only the bridge's
// UDP rules.
func TestUDPBypassVariants(t *testing.T) {
	tcpOnly := mustPlan(t, testConfig())
	if q := tcpOnly.UDPBypass(true); q.IsUDPBypass() || q.String() != tcpOnly.String() {
		t.Errorf("UDPBypass(true) of a plan without UDP ports: IsUDPBypass %v\n%s", q.IsUDPBypass(), q)
	}
	p := mustPlan(t, udpConfig())
	normal := p.String()
	on := p.UDPBypass(true)
	if p.String() != normal || p.IsUDPBypass() {
		t.Error("UDPBypass changed the plan it was called on")
	}
	for _, tt := range []struct {
		name      string
		p         *Plan
		overload  Overload
		draining  bool
		udpBypass bool
	}{
		{"normal", p, OverloadNone, false, false},
		{"udp bypass", on, OverloadNone, false, true},
		{"udp bypass, then tcp bypass", on.Overloaded(OverloadBypass), OverloadBypass, false, true},
		{"tcp refuse, then udp bypass", p.Overloaded(OverloadRefuse).UDPBypass(true), OverloadRefuse, false, true},
		{"udp bypass, then draining", on.Draining(), OverloadNone, true, true},
		{"draining, then udp bypass", p.Draining().UDPBypass(true), OverloadNone, true, true},
		{"draining, then overloaded", on.Draining().Overloaded(OverloadRefuse), OverloadNone, true, true},
		{"udp bypass off again", on.Overloaded(OverloadRefuse).UDPBypass(false), OverloadRefuse, false, false},
	} {
		if tt.p.Overload() != tt.overload || tt.p.IsDraining() != tt.draining || tt.p.IsUDPBypass() != tt.udpBypass {
			t.Errorf("%s: Overload() = %v, IsDraining() = %v, IsUDPBypass() = %v; want %v, %v, %v", tt.name,
				tt.p.Overload(), tt.p.IsDraining(), tt.p.IsUDPBypass(), tt.overload, tt.draining, tt.udpBypass)
		}
	}
	if got := on.UDPBypass(false).String(); got != normal {
		t.Errorf("UDPBypass(false) does not render as the normal plan:\n%s", got)
	}
	// Only the bridge's UDP rules differ, and both keep every fragment rule.
	bridgeOn, inetOn, _ := strings.Cut(on.String(), "table inet")
	bridgeOff, inetOff, _ := strings.Cut(normal, "table inet")
	if inetOn != inetOff {
		t.Errorf("UDPBypass changed the inet table:\n%s", inetOn)
	}
	for _, tt := range []struct {
		bridge      string
		has, hasNot []string
	}{
		{bridgeOff, []string{`"eth-client" udp dport @udp_ports counter packets 0 bytes 0 update @udpflows4 `, `"eth-server" udp sport @udp_ports counter packets 0 bytes 0 ether daddr set`},
			[]string{"@udpflows4 counter packets 0 bytes 0 update", "udp dport @udp_ports counter packets 0 bytes 0 accept"}},
		{bridgeOn, []string{`"eth-client" ip saddr . ip daddr . udp sport . udp dport @udpflows4 counter packets 0 bytes 0 update @udpflows4 `,
			`"eth-client" udp dport @udp_ports counter packets 0 bytes 0 accept`, `"eth-server" ip6 daddr . ip6 saddr . udp dport . udp sport @udpflows6 counter packets 0 bytes 0 ether daddr set`},
			[]string{"udp dport @udp_ports counter packets 0 bytes 0 update", "udp sport @udp_ports"}},
	} {
		for _, s := range tt.has {
			if !strings.Contains(tt.bridge, s) {
				t.Errorf("bridge table lacks %q:\n%s", s, tt.bridge)
			}
		}
		for _, s := range tt.hasNot {
			if strings.Contains(tt.bridge, s) {
				t.Errorf("bridge table has %q:\n%s", s, tt.bridge)
			}
		}
		if strings.Count(tt.bridge, " frag-off & 16383 != 0 ")+strings.Count(tt.bridge, " nexthdr ipv6-frag ") != 4 {
			t.Errorf("bridge table lacks the four fragment rules:\n%s", tt.bridge)
		}
	}
}

func TestBypassTimeout(t *testing.T) {
	cfg := testConfig()
	if got := mustPlan(t, cfg).Config().BypassTimeout; got != 5*time.Minute {
		t.Errorf("default BypassTimeout = %v, want 5m", got)
	}
	for _, d := range []time.Duration{time.Second, 90 * time.Second, 7 * 24 * time.Hour} {
		cfg.BypassTimeout = d
		if got := mustPlan(t, cfg).Config().BypassTimeout; got != d {
			t.Errorf("BypassTimeout %v became %v", d, got)
		}
	}
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{-time.Second, "BypassTimeout: -1s is out of range 1s..168h0m0s"},
		{999 * time.Millisecond, "BypassTimeout: 999ms is out of range"},
		{7*24*time.Hour + time.Second, "BypassTimeout: 168h0m1s is out of range"},
		{1500 * time.Millisecond, "BypassTimeout: 1.5s is not a whole number of seconds"},
	} {
		cfg.BypassTimeout = tt.d
		if _, err := NewPlan(cfg); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("NewPlan with BypassTimeout %v: %v; want an error containing %q", tt.d, err, tt.want)
		}
	}
}

func TestNftDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		time.Second:                           "1s",
		5 * time.Minute:                       "5m",
		90*time.Minute + 45*time.Second:       "1h30m45s",
		48*time.Hour + time.Second:            "2d1s",
		7 * 24 * time.Hour:                    "7d",
		time.Hour + 1500*time.Millisecond:     "1h1s500ms",
		25*time.Hour + 61*time.Second:         "1d1h1m1s",
		10*time.Minute + 999*time.Millisecond: "10m999ms",
	} {
		if got := nftDuration(d); got != want {
			t.Errorf("nftDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

// bypassElements matches the elements line(s) nft adds to a bypass set's
// listing once it holds flows (keys are concatenations: " . ").
var bypassElements = regexp.MustCompile(`(?m)^\t\telements = \{ [^}]* \. [^}]*\}\n`)

// Each variant is told apart by Tables (from the kernel's rules alone) and
// by Check (the wrong variant in the kernel is drift), with and without UDP.
func TestOverloadTablesAndCheck(t *testing.T) {
	n := newTestNS(t)
	p := mustPlan(t, testConfig())
	udp := mustPlan(t, udpConfig())
	variants := []*Plan{p, p.Draining(), p.Overloaded(OverloadBypass), p.Overloaded(OverloadRefuse),
		udp, udp.Draining(), udp.Overloaded(OverloadRefuse), udp.UDPBypass(true),
		udp.UDPBypass(true).Overloaded(OverloadBypass), udp.UDPBypass(true).Draining()}
	for i, applied := range variants {
		if err := applied.Apply(n.nft); err != nil {
			t.Fatalf("Apply variant %d: %v", i, err)
		}
		st, err := Tables(n.nft, "ghostwire")
		if err != nil {
			t.Fatal(err)
		}
		if want := (TablesState{Bridge: true, Inet: true, Overload: applied.Overload(), UDPBypass: applied.IsUDPBypass()}); st != want {
			t.Errorf("variant %d: Tables = %+v, want %+v", i, st, want)
		}
		for j, other := range variants {
			drift, err := other.Check(n.nft)
			if err != nil {
				t.Fatal(err)
			}
			if (len(drift) == 0) != (i == j) {
				t.Errorf("variant %d applied: Check of variant %d = %q", i, j, drift)
			}
		}
	}
	// Owned tables report their mode too.
	owner := n.lasting(t)
	if err := variants[2].ApplyOwned(owner); err != nil {
		t.Fatal(err)
	}
	st, err := Tables(n.nft, "ghostwire")
	if err != nil {
		t.Fatal(err)
	}
	if !st.Owned || st.Overload != OverloadBypass {
		t.Errorf("owned bypass tables: Tables = %+v", st)
	}
}

// Flows in the bypass sets survive every later plan applied over the same
// kind of table (they are what keeps a bypassed flow bridged), and the
// listing is still String() plus those elements.
func TestApplyKeepsBypassedFlows(t *testing.T) {
	n := newTestNS(t)
	cfg := testConfig()
	p := mustPlan(t, cfg)
	bypass := p.Overloaded(OverloadBypass)
	if err := bypass.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	// Owned tables take elements only from their owner: add them in Go.
	addFlows := func(c *nftables.Conn) {
		t.Helper()
		table := &nftables.Table{Name: "ghostwire", Family: nftables.TableFamilyBridge}
		for set, key := range map[string][]byte{
			bypassSets.name(ipFamilies[0]): flowKey("192.0.2.1", "192.0.2.2", 40000, 80),
			bypassSets.name(ipFamilies[1]): flowKey("2001:db8::1", "2001:db8::2", 40001, 443),
		} {
			if err := c.SetAddElements(&nftables.Set{Table: table, Name: set}, []nftables.SetElement{{Key: key}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Flush(); err != nil {
			t.Fatalf("adding flows to the bypass sets: %v", err)
		}
	}
	wantFlows := func(q *Plan, want int) {
		t.Helper()
		if got, err := BypassedFlows(n.nft, "ghostwire"); err != nil || got != want {
			t.Fatalf("BypassedFlows = %d, %v; want %d", got, err, want)
		}
		listing := n.ruleset(t)
		if want > 0 && (!strings.Contains(listing, "192.0.2.1 . 192.0.2.2 . 40000 . 80 ") ||
			!strings.Contains(listing, "2001:db8::1 . 2001:db8::2 . 40001 . 443 ")) {
			t.Fatalf("bypassed flows missing from the listing:\n%s", listing)
		}
		if got := bypassElements.ReplaceAllString(ownedMarks.ReplaceAllString(listing, ""), ""); got != q.String() {
			t.Fatalf("listing (bypass elements removed) differs from plan\n--- got\n%s--- want\n%s", got, q)
		}
		wantNoDrift(t, q, n.nft)
	}
	addFlows(n.nft)
	wantFlows(bypass, 2)

	other := cfg
	other.TCPPorts = []uint16{8080}
	other.BypassTimeout = time.Hour
	changed := mustPlan(t, other)
	for _, q := range []*Plan{p, p.Overloaded(OverloadRefuse), p.Draining(), changed, changed.Overloaded(OverloadBypass), bypass} {
		if err := q.Apply(n.nft); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		wantFlows(q, 2)
	}
	if got := n.run(t, "nft", "list", "set", "bridge", "ghostwire", "bypass4"); !strings.Contains(got, "\t\ttimeout 5m\n") {
		t.Errorf("bypass4 timeout not back to 5m:\n%s", got)
	}

	// Owned tables replace ordinary ones whole: the sets start empty. A
	// reload over the owning connection keeps them.
	owner := n.lasting(t)
	if err := bypass.ApplyOwned(owner); err != nil {
		t.Fatal(err)
	}
	wantFlows(bypass, 0)
	addFlows(owner)
	for _, q := range []*Plan{p, changed.Overloaded(OverloadRefuse)} {
		if err := q.ApplyOwned(owner); err != nil {
			t.Fatal(err)
		}
		wantFlows(q, 2)
	}
}

// A table whose sets cannot be updated in place (here a bypass4 of another
// type, made by hand) is replaced whole.
func TestApplyReplacesIncompatibleSets(t *testing.T) {
	n := newTestNS(t)
	n.run(t, "nft", "add table bridge ghostwire; add set bridge ghostwire bypass4 { type ipv4_addr; flags dynamic,timeout; }; "+
		"add set bridge ghostwire tcp_ports { type inet_service; }; add set bridge ghostwire bypass6 { type ipv4_addr; }; "+
		"add set bridge ghostwire stray { type inet_service; }")
	p := mustPlan(t, testConfig()).Overloaded(OverloadBypass)
	if err := p.Apply(n.nft); err != nil {
		t.Fatalf("Apply over incompatible sets: %v", err)
	}
	wantRuleset(t, n, p.String())
	wantNoDrift(t, p, n.nft)
	// In place, sets the plan lacks go too.
	n.run(t, "nft", "add set bridge ghostwire stray { type inet_service; }; add set inet ghostwire stray { type ipv4_addr; }")
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, p.String())
}

// flowKey is a bypass set key: saddr . daddr . sport . dport, each port
// padded to a 4-byte register as in a concatenation.
func flowKey(saddr, daddr string, sport, dport uint16) []byte {
	var key []byte
	for _, a := range []string{saddr, daddr} {
		key = append(key, netip.MustParseAddr(a).AsSlice()...)
	}
	for _, port := range []uint16{sport, dport} {
		key = append(key, byte(port>>8), byte(port), 0, 0)
	}
	return key
}

func TestBypassedFlowsWithoutTables(t *testing.T) {
	n := newTestNS(t)
	if got, err := BypassedFlows(n.nft, "ghostwire"); err != nil || got != 0 {
		t.Errorf("BypassedFlows with no tables = %d, %v", got, err)
	}
	if _, err := BypassedFlows(n.nft, ""); err == nil {
		t.Error("BypassedFlows with an empty name accepted")
	}
}
