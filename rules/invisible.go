package rules

import (
	"time"

	"github.com/google/nftables"
)

// The invisible mode (Config.Invisible, issue 15): the box says nothing at
// layer 2 with a MAC of its own. Every frame its IP stack sends out of the
// bridge leaves with the MACs of the hosts whose IP addresses it carries,
// learned from the frames it diverts; whatever it cannot rewrite so is
// dropped by the quiet table (quiet.go), which the provisioner installs
// for the box's whole life. docs/kernel.md has the measurements.
//
// A third table, `table netdev NAME`, does it, owned, applied and removed
// with the bridge and inet tables, so that nothing is diverted unless the
// rewrite that answers it is loaded too (fate-sharing: a dead proxy's
// diversion without the rewrite would hang every intercepted connection):
//
//   - lan_in (ingress of the client port) and wan_in (of the server port)
//     run before the bridge. Every frame the bridge table may lift (to an
//     intercepted port, and with UDP ports every IP fragment) teaches its
//     side's map the sender (IP -> source MAC) and the other side's map
//     the far end (destination IP -> destination MAC, the host or the
//     router the sender uses), and gets the learned bit in its mark. ARP
//     and neighbour discovery overwrite the sender's entry (delete, then
//     add: add alone never replaces a MAC), so a host that announces a new
//     MAC is followed at once.
//   - br_out (egress of the bridge) rewrites both MACs of every IPv4/IPv6
//     frame the box sends: destination from the map of the side the
//     destination IP lives on (the client side first), source from the
//     other side's, and tags the side in the mark. A miss leaves br0's
//     MAC as source: the quiet table drops the frame.
//   - The bridge table lifts a frame only with the learned bit (see
//     Plan.lift): if learning failed (a full map), the frame is bridged
//     untouched (fail open) instead of lifted to a box that could not
//     answer it (a hang). skb->mark survives from netdev ingress to bridge
//     prerouting.
//   - github.com/google/nftables has no `fwd` expression, so the rewritten
//     frame is accepted and the bridge forwards it by its fdb. An fdb miss
//     floods it to both ports: the bridge table's output chain drops the
//     copy on the wrong side (it would carry, say, the client's own MAC
//     back to the client).

// The mark bits the invisible mode uses. skb->mark is the only state that
// travels with a frame from netdev ingress to bridge prerouting (the
// learned bit) and from the bridge's egress to the bridge's output hook
// (the side bits). The inet table later sets the whole mark to
// Config.Mark on the packets it delivers to the proxy, so the routing
// mark must not overlap them (Config.Validate refuses it in invisible
// plans): the proxy's own packets may carry it, and the guard reads the
// side bits next to it.
const (
	MarkToClient   uint32 = 0x00100000 // br_out: a box frame rewritten toward the client side
	MarkToServer   uint32 = 0x00200000 // br_out: a box frame rewritten toward the server side
	MarkLearned    uint32 = 0x00400000 // lan_in/wan_in: the frame's hosts are learned, it may be lifted
	InvisibleMarks        = MarkToClient | MarkToServer | MarkLearned
)

const (
	// neighbourMapSize bounds each neighbour map. Once full, a new host's
	// frames are not learned, hence not lifted: they are bridged untouched
	// (bypassing the proxy) until entries time out. Size for every host on
	// both segments.
	neighbourMapSize = 65536

	defaultNeighbourTimeout = 60 * time.Second

	chainOutput = "output"
	chainLanIn  = "lan_in"
	chainWanIn  = "wan_in"
	chainBrOut  = "br_out"
)

// side is one bridge port's view: the map of the hosts on its side, the
// other side's, and the port field an intercepted port is in on its
// frames.
type side struct {
	name     string // "client" or "server"
	port     string
	own, far string // map name prefixes: "lan", "wan"
	tcp, udp portField
}

func (p *Plan) sides() [2]side {
	c := &p.cfg
	return [2]side{
		{"client", c.ClientPort, "lan", "wan", tcpDport, udpDport},
		{"server", c.ServerPort, "wan", "lan", tcpSport, udpSport},
	}
}

// neighbourMaps are lan4, wan4, lan6 and wan6: IP address -> MAC.
func (p *Plan) neighbourMaps() []setSpec {
	var specs []setSpec
	for _, f := range ipFamilies {
		for _, m := range []string{"lan", "wan"} {
			specs = append(specs, setSpec{name: m + f.suffix, keyType: f.addrType, dataType: nftables.TypeEtherAddr,
				dynamic: true, timeout: p.cfg.NeighbourTimeout})
		}
	}
	return specs
}

// netdevTable is the invisible mode's table. Its maps come first, so
// adding or dropping UDP ports (the udp_ports set) rebuilds it in place
// with every map's entries kept; its ports sets are the bridge table's.
func (p *Plan) netdevTable() table {
	sets := p.neighbourMaps()
	sets = append(sets, setSpec{name: setName, keyType: nftables.TypeInetService, ports: p.portsFor(nftables.TableFamilyBridge)})
	if len(p.cfg.UDPPorts) > 0 {
		sets = append(sets, setSpec{name: udpSetName, keyType: nftables.TypeInetService, ports: p.cfg.UDPPorts})
	}
	sides := p.sides()
	return table{family: nftables.TableFamilyNetdev, sets: sets, chains: []chain{
		{name: chainLanIn, hook: hookIngress, prio: prioFilter, device: p.cfg.ClientPort, rules: p.learnRules(sides[0])},
		{name: chainWanIn, hook: hookIngress, prio: prioFilter, device: p.cfg.ServerPort, rules: p.learnRules(sides[1])},
		{name: chainBrOut, hook: hookEgress, prio: prioFilter, device: p.cfg.Bridge, rules: p.rewriteRules()},
	}}
}

// learnRules are the rules of a port's ingress chain: learn and mark the
// frames the bridge table may lift (TCP, then UDP and IP fragments with UDP
// ports), then follow ARP and neighbour discovery. A frame learned from is
// accepted (on to the bridge): the chain's other rules cannot match it, and
// every bridged frame crosses this hook, so each rule not walked counts.
func (p *Plan) learnRules(s side) []rule {
	type match struct {
		name string
		item ruleItem
	}
	var rules []rule
	kinds := []string{"tcp"}
	if len(p.cfg.UDPPorts) > 0 {
		kinds = append(kinds, "udp", "fragment")
	}
	for _, kind := range kinds {
		for _, f := range ipFamilies {
			m := match{kind, portIn{s.tcp, setName}}
			switch kind {
			case "udp":
				m.item = portIn{s.udp, udpSetName}
			case "fragment":
				m.item = fragment{f}
			}
			rules = append(rules, countedLast("learn "+s.name+" "+m.name+" ip"+ipVersion(f), rule{m.item,
				neighbourStore{set: s.own + f.suffix, key: f.addr(false), mac: etherSaddr},
				neighbourStore{set: s.far + f.suffix, key: f.addr(true), mac: etherDaddr},
				markOr(MarkLearned)}, accept{}))
		}
	}
	v4, v6 := s.own+ipFamilies[0].suffix, s.own+ipFamilies[1].suffix
	ip6Saddr := ipFamilies[1].addr(false)
	return append(rules,
		countedLast("nbr-refresh arp "+s.name, rule{arpOpIn(arpOps), addrNonZero(arpSaddrIP),
			neighbourStore{del: true, set: v4, key: arpSaddrIP, mac: arpSaddrEther},
			neighbourStore{set: v4, key: arpSaddrIP, mac: arpSaddrEther}}),
		countedLast("nbr-refresh ndp "+s.name, rule{icmp6TypeIn(icmp6NA), addrNonZero(ip6Saddr),
			neighbourStore{del: true, set: v6, key: ip6Saddr, mac: etherSaddr},
			neighbourStore{set: v6, key: ip6Saddr, mac: etherSaddr}}),
	)
}

// ipVersion is "v4" or "v6", for rule names.
func ipVersion(f ipFamily) string {
	if f.addrLen == 4 {
		return "v4"
	}
	return "v6"
}

// rewriteRules are br_out's rules: per IP family, toward the client side
// (the destination in lan), then toward the server side. A rewritten
// frame is accepted: a later rule must not rewrite it again (an address
// in both maps goes to the client side, whole).
func (p *Plan) rewriteRules() []rule {
	var rules []rule
	for _, f := range ipFamilies {
		for _, to := range []struct {
			name     string
			dst, src string
			mark     uint32
		}{{"client", "lan", "wan", MarkToClient}, {"server", "wan", "lan", MarkToServer}} {
			rules = append(rules, countedLast("to "+to.name+" ip"+ipVersion(f), rule{
				etherFromMap{dst: etherDaddr, key: f.addr(true), set: to.dst + f.suffix},
				etherFromMap{dst: etherSaddr, key: f.addr(false), set: to.src + f.suffix},
				markOr(to.mark)}, accept{}))
		}
	}
	return rules
}

// guardRules are the bridge table's output chain: a box frame that
// br_out rewrote for one side and the bridge floods (an fdb miss) is
// dropped on the port of the other.
func (p *Plan) guardRules() []rule {
	c := &p.cfg
	sides := MarkToClient | MarkToServer
	return []rule{
		counted("guard: client-bound frame to server side", rule{oifname(c.ServerPort), markIs{sides, MarkToClient}, drop{}}),
		counted("guard: server-bound frame to client side", rule{oifname(c.ClientPort), markIs{sides, MarkToServer}, drop{}}),
	}
}
