package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// The live bypass list (`ghostwire bypass`): hosts whose new flows cross the
// bridge untouched, changed while the proxy runs, without a new plan. It is
// one interval set per IP family in the bridge table, bypass_hosts4 and
// bypass_hosts6, with flags interval,timeout and no default timeout: an
// element is permanent unless it carries its own timeout. The sets are in
// every plan (empty: their elements are not plan but state, like the flow
// sets'), made right after the bypass flow sets so that every in-place
// rebuild keeps them and their elements. A new TCP flow (the client's pure
// SYN to an intercepted port) whose client or server address is in the list
// is recorded in the bypass sets and accepted, as an unselected one is
// (selection.go); a datagram to (from) an intercepted UDP port from (to) a
// listed client, or to (from) a listed server, whose flow is not in the
// udpflows sets is accepted. Flows the proxy already carries are not looked
// at: changing the list only changes what happens to new flows.

// hostSets are the live bypass list's sets, by family.
var hostSets = flowSets{"bypass_hosts", l4TCP}

// isHostSet reports whether name is one of the live bypass sets.
func isHostSet(name string) bool {
	return slices.ContainsFunc(ipFamilies[:], func(f ipFamily) bool { return name == hostSets.name(f) })
}

// hostSetSpecs are the (empty) live bypass sets.
func hostSetSpecs() []setSpec {
	var specs []setSpec
	for _, f := range ipFamilies {
		specs = append(specs, setSpec{name: hostSets.name(f), keyType: f.addrType, interval: true, live: true})
	}
	return specs
}

// hostBypassTCPRules record a new TCP flow from or to a listed host in its
// family's bypass set and bridge it.
func (p *Plan) hostBypassTCPRules() []rule {
	c := &p.cfg
	var rules []rule
	for _, f := range ipFamilies {
		for _, daddr := range []bool{false, true} {
			rules = append(rules, counted("bypass host tcp "+addrField(daddr)+f.suffix, rule{iifname(c.ClientPort), portIn{tcpDport, setName}, pureSYN{},
				addrIn{fam: f, daddr: daddr, set: hostSets.name(f)}, flowStore{sets: bypassSets, fam: f}, accept{}}))
		}
	}
	return rules
}

// hostBypassUDPRules bridge the datagrams to and from intercepted UDP ports
// of flows from or to a listed host that the proxy does not relay.
func (p *Plan) hostBypassUDPRules() []rule {
	c := &p.cfg
	var rules []rule
	for _, side := range udpSides(c) {
		for _, f := range ipFamilies {
			for _, daddr := range []bool{false, true} {
				rules = append(rules, counted("bypass host udp "+side.name+" "+addrField(daddr)+f.suffix, rule{iifname(side.port), portIn{side.field, udpSetName},
					addrIn{fam: f, daddr: daddr, set: hostSets.name(f)},
					flowIn{sets: udpFlowSets, fam: f, reverse: side.fromServer, neg: true}, accept{}}))
			}
		}
	}
	return rules
}

// addrField is "saddr" or (daddr) "daddr", for rule names.
func addrField(daddr bool) string {
	if daddr {
		return "daddr"
	}
	return "saddr"
}

// HostBypass is one entry of the live bypass list as the kernel holds it.
type HostBypass struct {
	Prefix netip.Prefix
	// Expires is how long the entry has left; 0 for a permanent one.
	Expires time.Duration
}

// hostSet is the live bypass set of p's family in the bridge table name.
func hostSet(name string, p netip.Prefix) *nftables.Set {
	f := ipFamilies[0]
	if !p.Addr().Is4() {
		f = ipFamilies[1]
	}
	t := &nftables.Table{Name: name, Family: nftables.TableFamilyBridge}
	return &nftables.Set{Table: t, Name: hostSets.name(f), KeyType: f.addrType, Interval: true, HasTimeout: true}
}

// hostElements are the elements of prefix p in an interval set (its
// first address, and the address after its last as an interval end; see
// prefixElements), the start with timeout (0: none; the kernel refuses
// one on an interval end, whose expiry is its start's).
func hostElements(p netip.Prefix, timeout time.Duration) []nftables.SetElement {
	next := lastAddr(p).Next()
	els := []nftables.SetElement{{Key: p.Addr().AsSlice(), IntervalOpen: !next.IsValid(), Timeout: timeout}}
	if next.IsValid() {
		els = append(els, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
	}
	return els
}

// CheckHostPrefix checks a prefix for the live bypass list and masks it.
func CheckHostPrefix(p netip.Prefix) (netip.Prefix, error) {
	if !p.IsValid() {
		return p, fmt.Errorf("%q is not a valid prefix", p.String())
	}
	if p.Addr().Is4In6() {
		return p, fmt.Errorf("%s: use the IPv4 form of an IPv4-mapped address", p)
	}
	if p.Addr().Zone() != "" {
		return p, fmt.Errorf("%s: an address with a zone cannot be listed", p)
	}
	return p.Masked(), nil
}

// AddHostBypass adds prefix p to the live bypass list of the bridge table
// name, for timeout (0: permanently), in one batch on c (the connection
// that owns the tables, if they are owned). New flows from or to its
// addresses are bridged from then on. The same prefix listed already is
// replaced (a new timeout); one that overlaps another listed is refused
// (delete that one first).
func AddHostBypass(c *nftables.Conn, name string, p netip.Prefix, timeout time.Duration) error {
	_, err := addHostBypass(c, name, p, timeout, true)
	return err
}

// AddHostBypassIfUncovered is AddHostBypass that leaves the list as it is,
// and says so (added false), when p overlaps a prefix already listed:
// whoever listed that one chose its timeout.
func AddHostBypassIfUncovered(c *nftables.Conn, name string, p netip.Prefix, timeout time.Duration) (added bool, err error) {
	return addHostBypass(c, name, p, timeout, false)
}

func addHostBypass(c *nftables.Conn, name string, p netip.Prefix, timeout time.Duration, replace bool) (bool, error) {
	p, err := CheckHostPrefix(p)
	if err != nil {
		return false, err
	}
	if timeout < 0 || timeout%time.Millisecond != 0 {
		return false, fmt.Errorf("bypass timeout %v: must be a positive number of milliseconds", timeout)
	}
	have, err := HostBypasses(c, name)
	if err != nil {
		return false, err
	}
	for _, h := range have {
		switch {
		case !h.Prefix.Overlaps(p):
		case !replace:
			return false, nil
		case h.Prefix == p:
			// Replace it (a new timeout).
			if err := DelHostBypass(c, name, p); err != nil {
				return false, err
			}
		default:
			return false, fmt.Errorf("adding %s to the bypass list: it overlaps %s, already listed", p, h.Prefix)
		}
	}
	if err := c.SetAddElements(hostSet(name, p), hostElements(p, timeout)); err != nil {
		return false, fmt.Errorf("adding %s to the bypass list: %w", p, err)
	}
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("adding %s to the bypass list: %w", p, err)
	}
	return true, nil
}

// ErrNotListed is returned by DelHostBypass for a prefix not in the list.
var ErrNotListed = errors.New("not in the bypass list")

// DelHostBypass deletes prefix p from the live bypass list of the bridge
// table name, on c. New flows from or to its addresses are proxied again.
func DelHostBypass(c *nftables.Conn, name string, p netip.Prefix) error {
	p, err := CheckHostPrefix(p)
	if err != nil {
		return err
	}
	if err := c.SetDeleteElements(hostSet(name, p), hostElements(p, 0)); err != nil {
		return fmt.Errorf("deleting %s from the bypass list: %w", p, err)
	}
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting %s: %w", p, ErrNotListed)
		}
		return fmt.Errorf("deleting %s from the bypass list: %w", p, err)
	}
	return nil
}

// HostBypasses reads the live bypass list of the bridge table name from
// the kernel, IPv4 first, each family in address order. Expired entries
// the kernel has not collected yet are left out.
func HostBypasses(c *nftables.Conn, name string) ([]HostBypass, error) {
	var out []HostBypass
	for _, f := range ipFamilies {
		var zero netip.Prefix
		if f.addrLen == 4 {
			zero = netip.PrefixFrom(netip.IPv4Unspecified(), 32)
		} else {
			zero = netip.PrefixFrom(netip.IPv6Unspecified(), 128)
		}
		s := hostSet(name, zero)
		els, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("reading set %s of table bridge %s: %w", s.Name, name, err)
		}
		out = append(out, elementsHostBypasses(els)...)
	}
	return out, nil
}

// elementsHostBypasses reads the elements of a live bypass set back as its
// entries, with the time each start element has left.
func elementsHostBypasses(els []nftables.SetElement) []HostBypass {
	expires := map[netip.Addr]time.Duration{}
	for _, e := range els {
		if a, ok := netip.AddrFromSlice(e.Key); ok && !e.IntervalEnd {
			expires[a] = e.Expires
		}
	}
	var out []HostBypass
	for _, s := range elementsPrefixes(els) {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, err := netip.ParseAddr(s)
			if err != nil {
				continue // a range that is no prefix: not one the daemon adds
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, HostBypass{Prefix: p, Expires: expires[p.Addr()]})
	}
	return out
}
