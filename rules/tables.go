package rules

import "github.com/google/nftables"

// describe is the plan's ruleset: its bridge table, then its inet table.
func (p *Plan) describe() []table {
	return []table{
		{family: nftables.TableFamilyBridge, sets: p.sets(nftables.TableFamilyBridge), chains: []chain{{
			name: chainPrerouting, hook: hookPrerouting, prio: prioBridgeDstNAT, rules: p.bridgeRules(),
		}}},
		{family: nftables.TableFamilyINet, sets: p.sets(nftables.TableFamilyINet), chains: []chain{
			{name: chainPrerouting, hook: hookPrerouting, prio: prioMangle, rules: p.inetPrerouting()},
			{name: chainInput, hook: hookInput, prio: prioFilter, rules: p.inetInput()},
		}},
	}
}

// sets are the sets of the table of family fam. Every plan variant has the
// same sets.
func (p *Plan) sets(fam nftables.TableFamily) []setSpec {
	specs := []setSpec{{name: setName, keyType: nftables.TypeInetService, ports: p.portsFor(fam)}}
	if fam == nftables.TableFamilyBridge {
		for _, f := range ipFamilies {
			specs = append(specs, setSpec{name: f.set, keyType: f.keyType, dynamic: true, timeout: p.cfg.BypassTimeout})
		}
	}
	return specs
}

// bridgeRules are the rules of the bridge prerouting chain.
//
// Bypass first: flows in a bypass set cross the bridge untouched in every
// plan variant, so an overload's bypassed flows stay bridged after it ends.
// Each client frame refreshes the entry's timeout. While bypassing, a
// client's pure SYN to an intercepted port records its flow and is bridged.
//
// Then redirect both directions of intercepted flows up to the IP stack:
// set the destination MAC to br0's and mark the frame for the host.
func (p *Plan) bridgeRules() []rule {
	c := &p.cfg
	var rules []rule
	if p.overload == OverloadBypass {
		for _, f := range ipFamilies {
			rules = append(rules, rule{iifname(c.ClientPort), tcpPortIn{tcpDport, setName}, pureSYN{}, flowStore{fam: f}, accept{}})
		}
	}
	for _, f := range ipFamilies {
		rules = append(rules,
			rule{iifname(c.ClientPort), flowIn{fam: f}, flowStore{fam: f, update: true}, accept{}},
			rule{iifname(c.ServerPort), flowIn{fam: f, reverse: true}, accept{}},
		)
	}
	for _, r := range []struct {
		port  string
		field tcpPort
	}{{c.ClientPort, tcpDport}, {c.ServerPort, tcpSport}} {
		rules = append(rules, rule{iifname(r.port), tcpPortIn{r.field, setName}, etherDaddrSet(c.BridgeMAC), pktTypeHost{}})
	}
	return rules
}

// inetPrerouting are the rules of the inet prerouting chain. Order matters
// (KERNEL.md §2): traffic to the box itself first, then pure SYNs to
// TPROXY, and only then the socket rule, which would otherwise send a
// reused client port's SYN to a TIME_WAIT socket.
func (p *Plan) inetPrerouting() []rule {
	c := &p.cfg
	syn := rule{iifname(c.Bridge), tcpPortIn{tcpDport, setName}, pureSYN{}}
	switch {
	case p.draining:
		syn = append(syn, accept{})
	case p.overload == OverloadRefuse:
		syn = append(syn, rejectTCPReset{})
	default:
		// OverloadBypass too: SYNs it lets through never reach this table.
		syn = append(syn, tproxyTo(c.ProxyTCPPort), markSet(c.Mark), accept{})
	}
	return []rule{
		{fibLocal{}, accept{}},
		syn,
		{l4protoTCP{}, socketTransparent{}, markSet(c.Mark), accept{}},
	}
}

// inetInput refuses direct connections to the proxy port: diverted SYNs
// keep their original destination port, so they never match.
func (p *Plan) inetInput() []rule {
	return []rule{{tcpPortIs{tcpDport, p.cfg.ProxyTCPPort}, fibLocal{}, rejectTCPReset{}}}
}
