package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// Selection (Config.ClientCIDRs, ServerCIDRs, ExcludeClientCIDRs,
// ExcludeServerCIDRs): which hosts are proxied is decided in the bridge
// table, so unselected traffic never leaves the bridge. A new TCP flow
// (its client's pure SYN to an intercepted port) that is not selected is
// recorded in the bypass sets and accepted, so the rules at the top of
// the chain bridge every frame of it both ways for its life, as they do
// for an overload's bypassed flows. A UDP datagram to (from) an intercepted
// port whose flow is not selected and not in the udpflows sets (not one
// the proxy relays) is accepted. Flows the proxy already carries are not
// looked at, so a reload that changes the selection only changes what
// happens to new flows. Each list is one interval set per IP family
// (clients4, clients6, servers4, ...): one lookup however many prefixes.
// With all four lists empty the tables hold nothing of this.

// selection is one of the four lists: its sets' name prefix, its Config
// field, whether it holds servers (else clients), and whether it
// excludes (else it selects).
type selection struct {
	name    string
	field   string
	server  bool
	exclude bool
}

var selections = [...]selection{
	{"clients", "ClientCIDRs", false, false},
	{"servers", "ServerCIDRs", true, false},
	{"xclients", "ExcludeClientCIDRs", false, true},
	{"xservers", "ExcludeServerCIDRs", true, true},
}

// setName is the list's set for family f.
func (s selection) setName(f ipFamily) string { return s.name + f.suffix }

// list is cfg's prefixes of s.
func (cfg *Config) list(s selection) *[]netip.Prefix {
	switch s.field {
	case "ClientCIDRs":
		return &cfg.ClientCIDRs
	case "ServerCIDRs":
		return &cfg.ServerCIDRs
	case "ExcludeClientCIDRs":
		return &cfg.ExcludeClientCIDRs
	}
	return &cfg.ExcludeServerCIDRs
}

// hasSelection reports whether any of the four lists is set.
func (cfg *Config) hasSelection() bool {
	for _, s := range selections {
		if len(*cfg.list(s)) > 0 {
			return true
		}
	}
	return false
}

// normalisePrefixes masks ps and sorts them (IPv4 first, then by address,
// shorter first), drops duplicates and every prefix inside another: nft
// refuses overlapping intervals in a set without auto-merge, while
// adjacent ones are fine and are kept as they are. Invalid prefixes are
// kept (first) for check to report.
func normalisePrefixes(ps []netip.Prefix) []netip.Prefix {
	if len(ps) == 0 {
		return nil
	}
	var bad, good []netip.Prefix
	for _, p := range ps {
		if !p.IsValid() {
			bad = append(bad, p)
			continue
		}
		good = append(good, p.Masked())
	}
	slices.SortFunc(good, comparePrefixes)
	out := bad
	var last netip.Prefix
	for _, p := range good {
		// Prefixes nest or are disjoint; sorted so, one that overlaps the
		// last kept lies inside it.
		if last.IsValid() && last.Overlaps(p) {
			continue
		}
		out = append(out, p)
		last = p
	}
	return out
}

func comparePrefixes(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// checkSelection reports, through bad, invalid prefixes in the lists.
func checkSelection(cfg Config, bad func(field, format string, a ...any)) {
	for _, s := range selections {
		for _, p := range *cfg.list(s) {
			if !p.IsValid() {
				bad(s.field, "%q is not a valid prefix", p.String())
			}
		}
	}
}

// ofFamily are the prefixes of ps in family f.
func ofFamily(ps []netip.Prefix, f ipFamily) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is4() == (f.addrLen == 4) {
			out = append(out, p)
		}
	}
	return out
}

// selectionSets are the interval sets of the bridge table's selection, in
// order: for a list that selects, both families' sets (an empty one selects
// nothing of its family); for one that excludes, only the families it has
// prefixes of.
func (p *Plan) selectionSets() []setSpec {
	var specs []setSpec
	for _, s := range selections {
		list := *p.cfg.list(s)
		if len(list) == 0 {
			continue
		}
		for _, f := range ipFamilies {
			ps := ofFamily(list, f)
			if s.exclude && len(ps) == 0 {
				continue
			}
			specs = append(specs, setSpec{name: s.setName(f), keyType: f.addrType, interval: true, prefixes: ps})
		}
	}
	return specs
}

// unselected are the matches, one per selection set of family f, of which
// any says a frame's flow is not selected: its client (its server) not in
// a list that selects, or in one that excludes. A client frame carries the
// client's address as source, a server frame (fromServer) as destination.
func (p *Plan) unselected(f ipFamily, fromServer bool) []ruleItem {
	var ms []ruleItem
	for _, spec := range p.selectionSets() {
		for _, s := range selections {
			if spec.name == s.setName(f) {
				ms = append(ms, addrIn{fam: f, daddr: s.server != fromServer, set: spec.name, neg: !s.exclude})
			}
		}
	}
	return ms
}

// selectionTCPRules record an unselected new TCP flow (the client's pure
// SYN to an intercepted port) in its family's bypass set and bridge it.
func (p *Plan) selectionTCPRules() []rule {
	c := &p.cfg
	var rules []rule
	for _, f := range ipFamilies {
		for _, m := range p.unselected(f, false) {
			rules = append(rules, counted("unselected tcp "+m.(addrIn).set,
				rule{iifname(c.ClientPort), portIn{tcpDport, setName}, pureSYN{}, m, flowStore{sets: bypassSets, fam: f}, accept{}}))
		}
	}
	return rules
}

// selectionUDPRules bridge the datagrams to and from intercepted UDP ports
// of unselected flows that the proxy does not relay (not in udpflows).
func (p *Plan) selectionUDPRules() []rule {
	c := &p.cfg
	var rules []rule
	for _, side := range udpSides(c) {
		for _, f := range ipFamilies {
			for _, m := range p.unselected(f, side.fromServer) {
				rules = append(rules, counted("unselected udp "+side.name+" "+m.(addrIn).set, rule{iifname(side.port), portIn{side.field, udpSetName}, m,
					flowIn{sets: udpFlowSets, fam: f, reverse: side.fromServer, neg: true}, accept{}}))
			}
		}
	}
	return rules
}

// isSelectionSet reports whether name is one of the selection sets.
func isSelectionSet(name string) bool {
	for _, s := range selections {
		for _, f := range ipFamilies {
			if name == s.setName(f) {
				return true
			}
		}
	}
	return false
}

// addrIn is `ip saddr @clients4` (ip6, daddr; `!= @SET` when neg): the
// frame's address is (not) in an interval set of prefixes.
type addrIn struct {
	fam   ipFamily
	daddr bool
	set   string
	neg   bool
}

func (m addrIn) String() string {
	dir, op := "saddr", ""
	if m.daddr {
		dir = "daddr"
	}
	if m.neg {
		op = "!= "
	}
	return fmt.Sprintf("%s %s %s@%s", m.fam.nft, dir, op, m.set)
}

func (m addrIn) emit(e *emitter) {
	off := m.fam.saddr
	if m.daddr {
		off = m.fam.daddr
	}
	e.needIP(m.fam)
	s := e.set(m.set)
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: m.fam.addrLen},
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID, Invert: m.neg},
	)
}

// prefixElements are the elements nft 1.0.6 sends for an interval set of
// the sorted, disjoint prefixes ps: each prefix's first address, and the
// address after its last flagged as an interval end (none after the
// family's last address: the start is flagged open instead), preceded by
// an interval end at the zero address unless the first prefix starts
// there. An empty set has no elements.
func prefixElements(ps []netip.Prefix) []nftables.SetElement {
	if len(ps) == 0 {
		return nil
	}
	var els []nftables.SetElement
	if first := ps[0].Addr(); first != zeroAddr(first) {
		els = append(els, nftables.SetElement{Key: zeroAddr(first).AsSlice(), IntervalEnd: true})
	}
	for _, p := range ps {
		last := lastAddr(p)
		next := last.Next()
		start := nftables.SetElement{Key: p.Addr().AsSlice(), IntervalOpen: !next.IsValid()}
		els = append(els, start)
		if next.IsValid() {
			els = append(els, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	return els
}

// zeroAddr is the all-zero address of a's family.
func zeroAddr(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// lastAddr is the last address in the masked prefix p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// elementsPrefixes reads an interval set's elements (in any order, as the
// kernel dumps them) back as the prefixes they cover; a range that is not
// one prefix is described as "FIRST-LAST".
func elementsPrefixes(els []nftables.SetElement) []string {
	type bound struct {
		a   netip.Addr
		end bool
	}
	var bs []bound
	for _, e := range els {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok {
			continue
		}
		bs = append(bs, bound{a, e.IntervalEnd})
	}
	// Ascending; at one address the end of a range before the start of
	// the next (adjacent prefixes).
	slices.SortFunc(bs, func(x, y bound) int {
		if c := x.a.Compare(y.a); c != 0 {
			return c
		}
		if x.end == y.end {
			return 0
		}
		if x.end {
			return -1
		}
		return 1
	})
	var out []string
	for i := 0; i < len(bs); i++ {
		if bs[i].end {
			continue // the leading end at the zero address
		}
		lo := bs[i].a
		var hi netip.Addr
		if i+1 < len(bs) && bs[i+1].end {
			hi = bs[i+1].a.Prev()
			i++
		} else {
			hi = lastAddr(netip.PrefixFrom(lo, 0).Masked())
		}
		out = append(out, rangeString(lo, hi))
	}
	return out
}

// rangeString is lo..hi as the prefix it is (nft's listing form: a single
// address without /32 or /128), or "lo-hi".
func rangeString(lo, hi netip.Addr) string {
	for bits := 0; bits <= lo.BitLen(); bits++ {
		p := netip.PrefixFrom(lo, bits)
		if p.Masked().Addr() == lo && lastAddr(p.Masked()) == hi {
			return prefixString(p)
		}
	}
	return lo.String() + "-" + hi.String()
}

// prefixString is p as nft lists an interval set's element.
func prefixString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// renderPrefixes prints an interval set's elements the way nft does: in
// order, IPv4 two to a line, IPv6 one to a line (nft's calculate_delim).
func renderPrefixes(b *strings.Builder, ps []netip.Prefix) {
	strs := make([]string, len(ps))
	for i, p := range ps {
		strs[i] = prefixString(p)
	}
	renderElements(b, strs)
}

// renderElements prints listed elements as nft does for ipv4_addr (two to
// a line) or ipv6_addr (one to a line).
func renderElements(b *strings.Builder, strs []string) {
	if len(strs) == 0 {
		return
	}
	perLine := 1
	if !strings.Contains(strs[0], ":") {
		perLine = 2
	}
	b.WriteString("\t\telements = { ")
	for i, s := range strs {
		if i > 0 {
			if i%perLine == 0 {
				b.WriteString(",\n\t\t\t     ")
			} else {
				b.WriteString(", ")
			}
		}
		b.WriteString(s)
	}
	b.WriteString(" }\n")
}

// udpSide is one bridge port's view of an intercepted UDP flow: a client
// frame carries the intercepted port as destination, a server frame
// (fromServer) as source.
type udpSide struct {
	name       string
	port       string
	field      portField
	fromServer bool
}

func udpSides(c *Config) []udpSide {
	return []udpSide{{"client", c.ClientPort, udpDport, false}, {"server", c.ServerPort, udpSport, true}}
}
