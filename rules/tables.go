package rules

import (
	"slices"
	"time"

	"github.com/google/nftables"
)

// describe is the plan's ruleset: its bridge table, then its inet table
// and, invisible, its netdev table (invisible.go), whose plan also gives
// the bridge table an output chain.
func (p *Plan) describe() []table {
	tables := []table{
		{family: nftables.TableFamilyBridge, sets: p.sets(nftables.TableFamilyBridge), chains: []chain{{
			name: chainPrerouting, hook: hookPrerouting, prio: prioBridgeDstNAT, rules: p.bridgeRules(),
		}}},
		{family: nftables.TableFamilyINet, sets: p.sets(nftables.TableFamilyINet), chains: []chain{
			{name: chainPrerouting, hook: hookPrerouting, prio: prioMangle, rules: p.inetPrerouting()},
			{name: chainInput, hook: hookInput, prio: prioFilter, rules: p.inetInput()},
		}},
	}
	if p.cfg.Invisible {
		tables[0].chains = append(tables[0].chains, chain{name: chainOutput, hook: hookOutput, prio: prioBridgeFilter, rules: p.guardRules()})
		tables = append(tables, p.netdevTable())
	}
	return tables
}

// sets are the sets of the table of family fam. Every plan variant has the
// same sets. The UDP ones come last and only with UDP ports, so a TCP-only
// plan lists as it did before UDP, and adding or dropping UDP ports
// rebuilds a table in place (nft lists sets in the order they were made).
func (p *Plan) sets(fam nftables.TableFamily) []setSpec {
	specs := []setSpec{{name: setName, keyType: nftables.TypeInetService, ports: p.portsFor(fam)}}
	if fam == nftables.TableFamilyBridge {
		specs = append(specs, flowSetSpecs(bypassSets, p.cfg.BypassTimeout)...)
		// The live bypass list's, in every plan: right after the flow
		// sets, so every in-place rebuild keeps them and their elements.
		specs = append(specs, hostSetSpecs()...)
	}
	if len(p.cfg.UDPPorts) > 0 {
		specs = append(specs, setSpec{name: udpSetName, keyType: nftables.TypeInetService, ports: p.cfg.UDPPorts})
		if fam == nftables.TableFamilyBridge {
			specs = append(specs, flowSetSpecs(udpFlowSets, p.cfg.UDPSessionTimeout)...)
		}
	}
	// The selection's sets come last, and only with a selection: a
	// plan without lists as before; Apply recreates them at the end of
	// the table when others are made before them (queueClear).
	if fam == nftables.TableFamilyBridge {
		specs = append(specs, p.selectionSets()...)
	}
	return specs
}

// flowSetSpecs are the two (IPv4, IPv6) dynamic sets of sets, whose
// elements last timeout.
func flowSetSpecs(sets flowSets, timeout time.Duration) []setSpec {
	var specs []setSpec
	for _, f := range ipFamilies {
		specs = append(specs, setSpec{name: sets.name(f), keyType: f.keyType, dynamic: true, timeout: timeout})
	}
	return specs
}

// lift is a rule of items that redirects the frames it matches up to the
// box's IP stack: destination MAC := br0's, and marked for the host. The
// rule has no verdict, so later rules still see the frame. In invisible
// plans it lifts only frames whose hosts the netdev table learned (the
// MarkLearned bit, matched after items' matches, before their
// statements): a frame it could not learn (a full map) is bridged
// untouched rather than lifted to a box that cannot answer it.
func (p *Plan) lift(items ...ruleItem) rule {
	r := rule(items)
	if p.cfg.Invisible {
		i := slices.IndexFunc(r, isStatement)
		if i < 0 {
			i = len(r)
		}
		r = slices.Concat(r[:i:i], rule{markIs{MarkLearned, MarkLearned}}, r[i:])
	}
	return append(r, etherDaddrSet(p.cfg.BridgeMAC), pktTypeHost{})
}

// bridgeRules are the rules of the bridge prerouting chain.
//
// With UDP ports, every IP fragment is lifted first (fragmentRules).
//
// With a selection, an unselected new TCP flow's SYN is recorded in the
// bypass sets and bridged (selectionTCPRules), in every variant; so is
// one from or to a host in the live bypass list (hostBypassTCPRules).
//
// Bypass next: flows in a bypass set cross the bridge untouched in every
// plan variant, so an overload's bypassed flows stay bridged after it ends.
// Each client frame refreshes the entry's timeout. While bypassing, a
// client's pure SYN to an intercepted port records its flow and is bridged.
//
// Then redirect both directions of intercepted flows up to the IP stack:
// set the destination MAC to br0's and mark the frame for the host. The
// UDP ones come last (bridgeUDPRules).
func (p *Plan) bridgeRules() []rule {
	c := &p.cfg
	var rules []rule
	if len(c.UDPPorts) > 0 {
		rules = append(rules, p.fragmentRules()...)
	}
	rules = append(rules, p.selectionTCPRules()...)
	rules = append(rules, p.hostBypassTCPRules()...)
	if p.overload == OverloadBypass {
		for _, f := range ipFamilies {
			rules = append(rules, counted("overload bypass syn"+f.suffix,
				rule{iifname(c.ClientPort), portIn{tcpDport, setName}, pureSYN{}, flowStore{sets: bypassSets, fam: f}, accept{}}))
		}
	}
	for _, f := range ipFamilies {
		rules = append(rules,
			counted("bypass flow client"+f.suffix,
				rule{iifname(c.ClientPort), flowIn{sets: bypassSets, fam: f}, flowStore{sets: bypassSets, fam: f, update: true}, accept{}}),
			counted("bypass flow server"+f.suffix, rule{iifname(c.ServerPort), flowIn{sets: bypassSets, fam: f, reverse: true}, accept{}}),
		)
	}
	for _, r := range []struct {
		side  string
		port  string
		field portField
	}{{"client", c.ClientPort, tcpDport}, {"server", c.ServerPort, tcpSport}} {
		rules = append(rules, counted("lift tcp "+r.side, p.lift(iifname(r.port), portIn{r.field, setName})))
	}
	if len(c.UDPPorts) > 0 {
		rules = append(rules, p.bridgeUDPRules()...)
	}
	return rules
}

// fragmentRules lift every IP fragment arriving on either bridge port to
// the box. Only a datagram's first fragment carries the UDP header, so the
// port rules would lift it and bridge the rest past the box: the datagram
// would be lost on both sides. Lifted, the fragments are reassembled
// (the defrag the inet table's tproxy and socket expressions turn on)
// before the inet table sees the datagram, which is then proxied or, not
// intercepted, routed (TTL-1) instead of bridged. They come first, and
// have no verdict, so a first fragment that a later rule accepts (a
// bypassed flow's) still goes up with the rest of its datagram.
func (p *Plan) fragmentRules() []rule {
	var rules []rule
	for _, f := range ipFamilies {
		for _, side := range []struct{ name, port string }{{"client", p.cfg.ClientPort}, {"server", p.cfg.ServerPort}} {
			rules = append(rules, counted("lift fragment "+side.name+f.suffix, p.lift(iifname(side.port), fragment{f})))
		}
	}
	return rules
}

// bridgeUDPRules redirect datagrams to and from intercepted UDP ports. A
// client's datagram records its flow in the udpflows sets. Under
// UDPBypass only the recorded flows are redirected (both ways; client
// frames refresh them) and every other datagram to an intercepted port is
// accepted, i.e. bridged untouched. Otherwise, with a selection, the
// datagrams of unselected flows not in udpflows are bridged first
// (selectionUDPRules), then those from or to a host in the live bypass
// list (hostBypassUDPRules); UDPBypass bridges those anyway.
func (p *Plan) bridgeUDPRules() []rule {
	c := &p.cfg
	var rules []rule
	if !p.udpBypass {
		rules = append(rules, p.selectionUDPRules()...)
		rules = append(rules, p.hostBypassUDPRules()...)
		for _, f := range ipFamilies {
			rules = append(rules, counted("lift udp client"+f.suffix,
				p.lift(iifname(c.ClientPort), portIn{udpDport, udpSetName}, flowStore{sets: udpFlowSets, fam: f, update: true})))
		}
		return append(rules, counted("lift udp server", p.lift(iifname(c.ServerPort), portIn{udpSport, udpSetName})))
	}
	for _, f := range ipFamilies {
		rules = append(rules, counted("lift udp flow client"+f.suffix,
			p.lift(iifname(c.ClientPort), flowIn{sets: udpFlowSets, fam: f}, flowStore{sets: udpFlowSets, fam: f, update: true})))
	}
	rules = append(rules, counted("bridge udp client", rule{iifname(c.ClientPort), portIn{udpDport, udpSetName}, accept{}}))
	for _, f := range ipFamilies {
		rules = append(rules, counted("lift udp flow server"+f.suffix, p.lift(iifname(c.ServerPort), flowIn{sets: udpFlowSets, fam: f, reverse: true})))
	}
	return rules
}

// inetPrerouting are the rules of the inet prerouting chain. Order matters
// (KERNEL.md §2): traffic to the box itself first, then pure SYNs to
// TPROXY, and only then the socket rule, which would otherwise send a
// reused client port's SYN to a TIME_WAIT socket. UDP comes after TCP:
// datagrams of the proxy's sessions to their sockets first, then new
// flows to the UDP listener (routed through while draining).
func (p *Plan) inetPrerouting() []rule {
	c := &p.cfg
	syn := rule{iifname(c.Bridge), portIn{tcpDport, setName}, pureSYN{}}
	switch {
	case p.draining:
		syn = append(syn, accept{})
	case p.overload == OverloadRefuse:
		syn = append(syn, rejectTCPReset{})
	default:
		// OverloadBypass too: SYNs it lets through never reach this table.
		syn = append(syn, tproxyTo(c.ProxyTCPPort), markSet(c.Mark), accept{})
	}
	rules := []rule{
		counted("local", rule{fibLocal{}, accept{}}),
		counted("tcp syn", syn),
		counted("tcp socket", rule{l4protoIs(l4TCP), socketTransparent{}, markSet(c.Mark), accept{}}),
	}
	if len(c.UDPPorts) == 0 {
		return rules
	}
	udpSocket := counted("udp socket", rule{l4protoIs(l4UDP), socketTransparent{}, markSet(c.Mark), accept{}})
	udp := rule{iifname(c.Bridge), portIn{udpDport, udpSetName}}
	if p.draining {
		// Sessions go on (the socket rule first), new flows are routed.
		return append(rules, udpSocket, counted("udp port", append(udp, accept{})))
	}
	// The tproxy rule before the socket rule: tproxy hands a datagram to
	// a *connected* session socket (its client-facing one) or else to the
	// listener, while the socket rule would also pick a session socket in
	// the moment between its bind and its connect, and deliver another
	// client's datagram to a socket that is connected to someone else by
	// the time it arrives (lost). The socket rule still carries the
	// servers' replies to the upstream sockets. UDPBypass too: the flows
	// it lets through never reach this table.
	udp = counted("udp port", append(udp, tproxyTo(c.ProxyUDPPort), markSet(c.Mark), accept{}))
	return append(rules, udp, udpSocket)
}

// inetInput refuses direct connections to the proxy port (and datagrams to
// the UDP proxy port, with ICMP port unreachable): diverted packets keep
// their original destination port, so they never match.
func (p *Plan) inetInput() []rule {
	rules := []rule{counted("refuse tcp proxy port", rule{portIs{tcpDport, p.cfg.ProxyTCPPort}, fibLocal{}, rejectTCPReset{}})}
	if len(p.cfg.UDPPorts) > 0 {
		rules = append(rules, counted("refuse udp proxy port", rule{portIs{udpDport, p.cfg.ProxyUDPPort}, fibLocal{}, rejectPortUnreachable{}}))
	}
	return rules
}
