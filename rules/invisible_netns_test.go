package rules

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
)

// The invisible mode and the quiet table in the kernel: in a throwaway
// namespace (root), then on traffic in the overload lab.

// bridgeWithPorts makes, in n, bridge br with two veth ports (their peers
// unbridged), as the provisioner does before it applies an invisible plan:
// the netdev chains hook these devices.
func (n *testNS) bridgeWithPorts(t *testing.T, br string, ports ...string) {
	t.Helper()
	b := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: br}}
	if err := n.nl.LinkAdd(b); err != nil {
		t.Fatalf("adding bridge %s: %v", br, err)
	}
	for _, port := range ports {
		if err := n.nl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: port, MasterIndex: b.Index}, PeerName: port + "-p"}); err != nil {
			t.Fatalf("adding port %s: %v", port, err)
		}
	}
}

// invisibleNS is a namespace with the invisible test config's bridge and
// ports.
func invisibleNS(t *testing.T) *testNS {
	t.Helper()
	n := newTestNS(t)
	cfg := invisibleConfig()
	n.bridgeWithPorts(t, cfg.Bridge, cfg.ClientPort, cfg.ServerPort)
	return n
}

// TestInvisibleAppliesAsString: each invisible golden plan, applied to a
// namespace with a real bridge and ports, lists as String (netdev chains,
// devices, maps, the guard) and Check sees no drift; the quiet table too,
// and `nft -f` of its String compiles to what Check expects.
func TestInvisibleAppliesAsString(t *testing.T) {
	n := invisibleNS(t)
	for name, p := range goldenPlans(t) {
		if !p.cfg.Invisible {
			continue
		}
		t.Run(name, func(t *testing.T) {
			if err := p.Apply(n.nft); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			wantRuleset(t, n, p.String())
			wantNoDrift(t, p, n.nft)
			if st, err := Tables(n.nft, p.cfg.Name); err != nil || st != (TablesState{Bridge: true, Inet: true, Netdev: true}) {
				t.Errorf("Tables = %+v, %v", st, err)
			}
			if err := RemoveTables(n.nft, p.cfg.Name); err != nil {
				t.Fatalf("RemoveTables: %v", err)
			}
			wantRuleset(t, n, "")
		})
	}
	q := testQuiet()
	for _, apply := range []func() error{
		func() error { return q.Apply(n.nft) },
		func() error {
			n.run(t, "nft", "-f", writeTemp(t, q.String()))
			return nil
		},
	} {
		if err := apply(); err != nil {
			t.Fatalf("applying the quiet table: %v", err)
		}
		wantRuleset(t, n, q.String())
		if drift, err := q.Check(n.nft); err != nil || len(drift) > 0 {
			t.Fatalf("quiet Check = %q, %v", drift, err)
		}
		if err := q.Remove(n.nft); err != nil {
			t.Fatal(err)
		}
		wantRuleset(t, n, "")
	}
}

// TestInvisibleOwned: ApplyOwned owns all three tables, status and
// counters know the netdev one, reloads on the same connection keep the
// learned hosts, and closing the owner takes all three away at once.
func TestInvisibleOwned(t *testing.T) {
	n := invisibleNS(t)
	owner := n.lasting(t)
	cfg := invisibleConfig()
	cfg.UDPPorts, cfg.ProxyUDPPort = []uint16{53}, 3130
	p := mustPlan(t, cfg)
	if err := p.ApplyOwned(owner); err != nil {
		t.Fatalf("ApplyOwned: %v", err)
	}
	listing := n.ruleset(t)
	if c := strings.Count(listing, "\tflags owner\n"); c != 3 {
		t.Errorf("%d tables list as owned, want 3:\n%s", c, listing)
	}
	if got := ownedMarks.ReplaceAllString(listing, ""); got != p.String() {
		t.Errorf("owned listing differs from plan\n--- got\n%s--- want\n%s", got, p)
	}
	port, err := owner.GetPortID()
	if err != nil {
		t.Fatal(err)
	}
	if st, err := Tables(n.nft, cfg.Name); err != nil ||
		st != (TablesState{Bridge: true, Inet: true, Netdev: true, Owned: true, OwnerPortID: port}) {
		t.Errorf("Tables = %+v, %v", st, err)
	}
	wantNoDrift(t, p, n.nft)
	cs, err := Counters(n.nft, cfg.Name)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, c := range cs {
		got[c.Table] = append(got[c.Table], c.Rule)
	}
	if want := plannedNames(p); !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("Counters names = %v, want %v", got, want)
	}

	// A learned host survives reloads on the owning connection: variants,
	// other ports, UDP dropped, another timeout.
	// (Through the owner: no other socket may change an owned table.)
	lan4 := &nftables.Set{Table: &nftables.Table{Name: cfg.Name, Family: nftables.TableFamilyNetdev}, Name: "lan4",
		KeyType: nftables.TypeIPAddr, DataType: nftables.TypeEtherAddr, IsMap: true}
	if err := owner.SetAddElements(lan4, []nftables.SetElement{{Key: []byte{192, 0, 2, 1}, Val: []byte{2, 0, 0, 0, 0, 1}}}); err != nil {
		t.Fatal(err)
	}
	if err := owner.Flush(); err != nil {
		t.Fatalf("adding a host to lan4: %v", err)
	}
	cfg2 := invisibleConfig()
	cfg2.TCPPorts = []uint16{8080}
	cfg2.NeighbourTimeout = 5 * time.Minute
	p2 := mustPlan(t, cfg2)
	for _, q := range []*Plan{p, p.Draining(), p.UDPBypass(true), p.Overloaded(OverloadBypass), p2, p} {
		if err := q.ApplyOwned(owner); err != nil {
			t.Fatalf("reload: %v", err)
		}
		if got := ownedMarks.ReplaceAllString(n.ruleset(t), ""); !strings.HasPrefix(got, listedPrefix(q)) {
			t.Fatalf("after reload\n--- got\n%s--- want\n%s", got, q)
		}
		if m := n.run(t, "nft", "list", "map", "netdev", "ghostwire", "lan4"); !hasElement(m, "192.0.2.1", "02:00:00:00:00:01") {
			t.Fatalf("the learned host is gone after a reload:\n%s", m)
		}
	}

	// Fail-open with fate-sharing: the kernel drops all three at once.
	if err := owner.CloseLasting(); err != nil {
		t.Fatal(err)
	}
	waitTablesGone(t, n, cfg.Name, func(st TablesState) {
		if st.Netdev && !st.Bridge || st.Bridge && !st.Netdev {
			t.Fatalf("the tables went one by one: %+v", st)
		}
	})
	wantRuleset(t, n, "")
}

// listedPrefix is what a plan lists as up to its netdev table's maps,
// whose elements String does not print.
func listedPrefix(p *Plan) string {
	s := p.String()
	if i := strings.Index(s, "\tmap lan4 {"); i >= 0 {
		return s[:i]
	}
	return s
}

// TestInvisibleReloadKeepsMaps: in-place rebuilds (Apply) keep every
// neighbour map's elements: the same plan, its variants, adding and
// dropping UDP ports (a set after the maps), other TCP ports and timeout.
func TestInvisibleReloadKeepsMaps(t *testing.T) {
	n := invisibleNS(t)
	p := mustPlan(t, invisibleConfig())
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	elements := map[string][2]string{
		"lan4": {"192.0.2.1", "02:00:00:00:00:01"}, "wan4": {"198.51.100.2", "02:00:00:00:00:02"},
		"lan6": {"2001:db8::1", "02:00:00:00:00:03"}, "wan6": {"2001:db8:1::2", "02:00:00:00:00:04"},
	}
	for m, el := range elements {
		n.run(t, "nft", fmt.Sprintf("add element netdev ghostwire %s { %s : %s }", m, el[0], el[1]))
	}
	udp := invisibleConfig()
	udp.UDPPorts, udp.ProxyUDPPort = []uint16{53, 443}, 3130
	udp.TCPPorts = []uint16{25}
	udp.NeighbourTimeout = time.Hour
	pu := mustPlan(t, udp)
	for i, q := range []*Plan{p, p, p.Draining(), p.Overloaded(OverloadRefuse), pu, pu.UDPBypass(true), p} {
		if err := q.Apply(n.nft); err != nil {
			t.Fatalf("Apply %d: %v", i, err)
		}
		wantNoDrift(t, q, n.nft)
		for m, el := range elements {
			if got := n.run(t, "nft", "list", "map", "netdev", "ghostwire", m); !hasElement(got, el[0], el[1]) {
				t.Fatalf("Apply %d: map %s lost %s:\n%s", i, m, el, got)
			}
		}
	}
	// Maps full of traffic are not drift.
	wantNoDrift(t, p, n.nft)
}

// TestInvisibleOff: a plan without Invisible removes the netdev table (and
// the bridge table's guard) in its batch, and Check of it reports a netdev
// table left behind; RemoveTables removes the netdev table, also alone.
func TestInvisibleOff(t *testing.T) {
	n := invisibleNS(t)
	inv := mustPlan(t, invisibleConfig())
	vis := mustPlan(t, testConfig())
	if err := inv.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	drift, err := vis.Check(n.nft)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(drift, "table netdev ghostwire is not in the plan") {
		t.Errorf("Check of the visible plan over the invisible tables = %q", drift)
	}
	if err := vis.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, vis.String())
	wantNoDrift(t, vis, n.nft)

	// The same on one owning connection.
	owner := n.lasting(t)
	for _, q := range []*Plan{inv, vis, inv} {
		if err := q.ApplyOwned(owner); err != nil {
			t.Fatal(err)
		}
		if got := ownedMarks.ReplaceAllString(n.ruleset(t), ""); got != q.String() {
			t.Fatalf("owned\n--- got\n%s--- want\n%s", got, q)
		}
	}
	if err := inv.Apply(owner); err != nil {
		t.Fatal(err)
	}
	if err := RemoveTables(n.nft, "ghostwire"); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, "")
	// A netdev table alone (a half-removed box) goes too; a same-named
	// table of another family stays.
	n.run(t, "nft", "add table netdev ghostwire; add table ip ghostwire")
	if err := RemoveTables(n.nft, "ghostwire"); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, "table ip ghostwire {\n}\n")
}

// TestInvisibleDrift: Check sees a changed neighbour map, a rule added to
// a netdev chain, and a missing netdev chain.
func TestInvisibleDrift(t *testing.T) {
	n := invisibleNS(t)
	p := mustPlan(t, invisibleConfig())
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	n.run(t, "nft", "add map netdev ghostwire wan6 { type ipv6_addr : ether_addr; size 65536; flags dynamic,timeout; timeout 2m; }")
	n.run(t, "nft", "add rule netdev ghostwire lan_in counter")
	n.run(t, "nft", "delete chain netdev ghostwire br_out")
	wantDriftRepaired(t, p, n.nft, []string{
		"table netdev ghostwire: map wan6 differs from plan (type ipv6_addr : ether_addr; size 65536; flags dynamic,timeout; timeout 1m)",
		"chain netdev ghostwire lan_in has 5 rules, plan has 4",
		"chain netdev ghostwire br_out is missing",
	})
}

// TestQuietApplyRemove: Apply twice (in place, then with another MAC),
// Remove twice; the plan's tables and the quiet table leave each other
// alone; Check and Counters.
func TestQuietApplyRemove(t *testing.T) {
	n := invisibleNS(t)
	q := testQuiet()
	if drift, err := q.Check(n.nft); err != nil || !slices.Equal(drift, []string{"table netdev ghostwire_quiet is missing"}) {
		t.Errorf("Check with no table = %q, %v", drift, err)
	}
	for range 2 {
		if err := q.Apply(n.nft); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		wantRuleset(t, n, q.String())
	}
	q2 := q
	q2.BridgeMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	if err := q2.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, q2.String())
	if drift, err := q.Check(n.nft); err != nil || len(drift) != 5 {
		t.Errorf("Check of the old MAC = %q, %v; want its 5 rules differing", drift, err)
	}
	cs, err := q2.Counters(n.nft)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range cs {
		if c.Table != "quiet" {
			t.Errorf("counter %+v: table is not quiet", c)
		}
		names = append(names, c.Rule)
	}
	if want := []string{"box arp", "box ndp", "box mld", "box igmp", "box other"}; !slices.Equal(names, want) {
		t.Errorf("Counters = %v, want %v", names, want)
	}

	p := mustPlan(t, invisibleConfig())
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, q2.String()+p.String())
	if err := RemoveTables(n.nft, p.cfg.Name); err != nil {
		t.Fatal(err)
	}
	wantRuleset(t, n, q2.String())
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := q.Remove(n.nft); err != nil {
			t.Fatalf("Remove: %v", err)
		}
		wantRuleset(t, n, p.String())
	}
	if cs, err := q.Counters(n.nft); err != nil || len(cs) != 0 {
		t.Errorf("Counters with no table = %v, %v", cs, err)
	}
}

// TestInvisibleTraffic runs the recipe in the overload lab (no proxy: a
// diverted connection finds no socket and is routed by the box, the
// fail-open path): br arp off and the quiet table, as the provisioner sets
// them up. A connection to an intercepted port is learned on the ports'
// ingress, its frames carry the learned bit to bridge prerouting (the lift
// rules match it), and every frame the box routes reaches the server with
// the client's MAC (and the client with the server's); no frame with the
// box's MAC reaches the server. Without the learning rules, a connection is
// bridged untouched (fail open), not lifted.
func TestInvisibleTraffic(t *testing.T) {
	ol := newOverloadLab(t)
	cfg := ol.plan.Config()
	cfg.Invisible = true
	// As the recipe has it: the ports say nothing of their own (no IPv6:
	// no MLD, DAD or RS from their link-local addresses, which go out of
	// the port, not through the bridge's egress), and the bridge has a MAC
	// of its own (by default it takes a port's, whose frames would look
	// like the bridge's) and no ARP.
	ol.brMAC = net.HardwareAddr{0x02, 0x98, 0, 0, 0x01, 0xfe}
	cfg.BridgeMAC = ol.brMAC
	for _, port := range []string{cfg.ClientPort, cfg.ServerPort} {
		if err := ol.Box.Sysctl("net.ipv6.conf."+port+".disable_ipv6", "1"); err != nil {
			t.Fatal(err)
		}
	}
	for _, args := range [][]string{{"address", ol.brMAC.String()}, {"arp", "off"}} {
		if out, err := ol.Box.Command(t.Context(), "ip", append([]string{"link", "set", cfg.Bridge}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip link set %s %v: %v: %s", cfg.Bridge, args, err, out)
		}
	}
	p := mustPlan(t, cfg)
	q := Quiet{Name: cfg.Name, Bridge: cfg.Bridge, BridgeMAC: ol.brMAC}
	if err := q.Apply(ol.nft); err != nil {
		t.Fatal(err)
	}
	ol.apply(t, p)
	// A stale MAC for the client, which its own ARP request (NS) replaces:
	// the client resolves the server afresh.
	const stale = "02:00:00:00:00:99"
	for m, ip := range map[string]netip.Addr{"lan4": ol.ClientIP4, "lan6": ol.ClientIP6} {
		if out, err := ol.Box.Command(t.Context(), "nft", fmt.Sprintf("add element netdev %s %s { %s : %s }", cfg.Name, m, ip, stale)).CombinedOutput(); err != nil {
			t.Fatalf("seeding %s: %v: %s", m, err, out)
		}
	}
	if out, err := ol.Client.Command(t.Context(), "ip", "neigh", "flush", "all").CombinedOutput(); err != nil {
		t.Fatalf("flushing the client's neighbours: %v: %s", err, out)
	}

	for _, server := range []netip.Addr{ol.ServerIP4, ol.ServerIP6} {
		v := map[bool]string{false: "v4", true: "v6"}[server.Is6()]
		client := map[bool]netip.Addr{false: ol.ClientIP4, true: ol.ClientIP6}[server.Is6()]
		t.Run("ip"+v, func(t *testing.T) {
			var conn net.Conn
			capt, err := ol.Server.Capture(ol.ServerIf)
			if err != nil {
				t.Fatal(err)
			}
			if conn, err = ol.dial(server, 5*time.Second); err != nil {
				t.Fatalf("connecting through the invisible box: %v", err)
			}
			defer conn.Close()
			for i := range 3 {
				if err := roundTrip(conn, fmt.Sprintf("invisible %d", i)); err != nil {
					t.Fatal(err)
				}
			}
			frames, err := capt.Stop()
			if err != nil {
				t.Fatal(err)
			}
			local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
			var ours int
			for _, f := range frames {
				if f.Ethernet.Source.String() == ol.brMAC.String() {
					t.Errorf("a frame from the box's MAC reached the server: %v", f)
				}
				if f.Src != local.Addr() || f.SrcPort != local.Port() || f.DstPort != labPort {
					continue
				}
				ours++
				ttl := int(f.Ethernet.Payload[8])
				if server.Is6() {
					ttl = int(f.Ethernet.Payload[7])
				}
				// Routed by the box (TTL-1) with the client's MAC.
				if f.Ethernet.Source.String() != ol.ClientMAC.String() || (ttl != clientTTL-1 && ttl != kernelTTL-1) {
					t.Errorf("frame %v reached the server from %s with TTL %d; want the client's MAC %s, routed (TTL %d)",
						f, f.Ethernet.Source, ttl, ol.ClientMAC, clientTTL-1)
				}
			}
			if ours == 0 {
				t.Fatal("no frame of the connection reached the server")
			}
			for m, want := range map[string][2]string{
				"lan" + v[1:]: {client.String(), ol.ClientMAC.String()},
				"wan" + v[1:]: {server.String(), ol.ServerMAC.String()},
			} {
				if got := ol.mapList(t, m); !hasElement(got, want[0], want[1]) || strings.Contains(got, stale) {
					t.Errorf("map %s does not hold %s : %s, or still the stale MAC:\n%s", m, want[0], want[1], got)
				}
			}
			cs := ol.counters(t)
			for _, k := range []string{
				"netdev/learn client tcp ip" + v, "netdev/learn server tcp ip" + v,
				"netdev/to server ip" + v, "netdev/to client ip" + v,
				// Counted after the learned bit's match: the mark set on
				// the port's ingress reached bridge prerouting.
				"bridge/lift tcp client", "bridge/lift tcp server",
				// The client's ARP request (NS) replaced the stale MAC:
				// delete then add, both with the MAC register.
				map[bool]string{false: "netdev/nbr-refresh arp client", true: "netdev/nbr-refresh ndp client"}[server.Is6()],
			} {
				if cs[k] == 0 {
					t.Errorf("counter %s is 0; counters: %v", k, cs)
				}
			}
		})
	}

	// The guard: with the bridge's fdb flushed, a frame the box sends to
	// the server floods; the copy toward the client is dropped.
	conn, err := ol.dial(ol.ServerIP4, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if out, err := ol.Box.Command(t.Context(), "ip", "link", "set", cfg.Bridge, "type", "bridge", "fdb_flush").CombinedOutput(); err != nil {
		t.Fatalf("flushing the fdb: %v: %s", err, out)
	}
	capt, err := ol.Client.Capture(ol.ClientIf)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(conn, "after an fdb flush"); err != nil {
		t.Fatal(err)
	}
	frames, err := capt.Stop()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range frames {
		// The client's own frames carry its MAC too, with its TTLs; a
		// flooded copy of one the box routed has them one lower.
		routed := f.Src == ol.ClientIP4 && (f.Ethernet.Payload[8] == clientTTL-1 || f.Ethernet.Payload[8] == kernelTTL-1)
		if s := f.Ethernet.Source.String(); routed || s == ol.brMAC.String() {
			t.Errorf("the client got a frame the box sent to the server, or one from the box's MAC: %s %v", s, f)
		}
	}
	if cs := ol.counters(t); cs["bridge/guard: server-bound frame to client side"] == 0 {
		t.Errorf("the guard dropped nothing after an fdb flush; counters: %v", cs)
	}
	if cs, err := q.Counters(ol.nft); err == nil {
		t.Logf("quiet table: %v", cs)
	}

	// Fail open: without learning, nothing is lifted; the connection is
	// bridged untouched.
	ol.Box.Command(t.Context(), "nft", "flush chain netdev ghostwire lan_in; flush chain netdev ghostwire wan_in").Run()
	var fresh net.Conn
	h := ol.capture(t, localAddr(&fresh), func() {
		var err error
		if fresh, err = ol.dial(ol.ServerIP4, 5*time.Second); err != nil {
			t.Fatalf("connecting without learning: %v", err)
		}
		defer fresh.Close()
		if err := roundTrip(fresh, "unlearned"); err != nil {
			t.Fatal(err)
		}
	})
	if !h.bridged(ol.ClientMAC) {
		t.Errorf("without learning, the server got %v; want bridged (client MAC %s, TTL %d)", h, ol.ClientMAC, clientTTL)
	}
	if err := RemoveTables(ol.nft, cfg.Name); err != nil {
		t.Fatal(err)
	}
	if err := q.Remove(ol.nft); err != nil {
		t.Fatal(err)
	}
}

// hasElement reports whether a map's listing holds key : value (nft lists
// an element as "KEY expires 59s944ms : VALUE", and as "KEY timeout 1m
// expires ... : VALUE" once the map's timeout differs from the one it was
// added with).
func hasElement(listing, key, value string) bool {
	return regexp.MustCompile(`[{ ]` + regexp.QuoteMeta(key) + `( timeout \S+)?( expires \S+)? : ` + regexp.QuoteMeta(value) + `[ ,\n]`).MatchString(listing)
}

// mapList lists a neighbour map of the box's netdev table.
func (ol *overloadLab) mapList(t *testing.T, name string) string {
	t.Helper()
	out, err := ol.Box.Command(t.Context(), "nft", "list", "map", "netdev", ol.plan.cfg.Name, name).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list map %s: %v: %s", name, err, out)
	}
	return string(out)
}

// counters are the box's rule counters (packets), by "table/rule".
func (ol *overloadLab) counters(t *testing.T) map[string]uint64 {
	t.Helper()
	cs, err := Counters(ol.nft, ol.plan.cfg.Name)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]uint64{}
	for _, c := range cs {
		m[c.Table+"/"+c.Rule] = c.Packets
	}
	return m
}

// writeTemp writes text to a file in t's temporary directory.
func writeTemp(t *testing.T, text string) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "*.nft")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}
