package provision

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/bridge"
)

// Reach is how the box routes towards one side of the wire: the proxy
// answers clients and dials servers with ordinary route lookups, so a side
// the box has no route to out the bridge is a side it cannot proxy.
type Reach struct {
	Side   string       // "client" or "server"
	Family int          // unix.AF_INET or AF_INET6
	Prefix netip.Prefix // a selected prefix; invalid for "any address"
	// Via is the link the lookup chose ("" when there is no route);
	// for "any address", the bridge if any route of the family goes
	// out of it.
	Via string
}

// maxSampled bounds the route lookups per side: a selection can hold
// thousands of prefixes, and a handful shows a routing mistake.
const maxSampled = 8

// readReach looks up routes to each side: to a host in each selected
// prefix, or, with no selection, whether any route leaves by the bridge.
func (b *Box) readReach(d *Desired) ([]Reach, error) {
	var clients, servers []netip.Prefix
	if d.Rules != nil {
		cfg := d.Rules.Config()
		clients, servers = cfg.ClientCIDRs, cfg.ServerCIDRs
	}
	br, err := b.Netlink.LinkByName(d.Bridge.Name)
	if err != nil {
		return nil, nil // the links check says the bridge is missing
	}
	var out []Reach
	for _, side := range []struct {
		name  string
		cidrs []netip.Prefix
	}{{"client", clients}, {"server", servers}} {
		for i, p := range side.cidrs {
			if i == maxSampled {
				break
			}
			r := Reach{Side: side.name, Family: famOf(p.Addr()), Prefix: p}
			rs, err := b.Netlink.RouteGet(net.IP(sampleHost(p).AsSlice()))
			if err == nil && len(rs) > 0 {
				if l, err := b.Netlink.LinkByIndex(rs[0].LinkIndex); err == nil {
					r.Via = l.Attrs().Name
				}
			}
			out = append(out, r)
		}
		if len(side.cidrs) > 0 {
			continue // a selection of one family selects none of the other
		}
		for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
			r := Reach{Side: side.name, Family: fam}
			ok, err := routesVia(b.Netlink, br, fam)
			if err != nil {
				return nil, err
			}
			if ok {
				r.Via = d.Bridge.Name
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// routesVia reports whether a route of family fam in the main table goes
// out of link l, IPv6 link-local and multicast routes aside (the kernel
// adds those to every link with IPv6 on).
func routesVia(h *netlink.Handle, l netlink.Link, fam int) (bool, error) {
	rs, err := bridge.RetryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(fam, &netlink.Route{LinkIndex: l.Attrs().Index}, netlink.RT_FILTER_OIF)
	})
	if err != nil {
		return false, fmt.Errorf("listing routes via %s: %w", l.Attrs().Name, err)
	}
	for _, r := range rs {
		if r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) {
			continue
		}
		return true, nil
	}
	return false, nil
}

func famOf(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// sampleHost is a host address inside p: its first after the network
// address, unless p is that small.
func sampleHost(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr()
	if p.Bits() < a.BitLen()-1 {
		a = a.Next()
	}
	return a
}

// checkRoutes: the proxy's answers to clients and its dials to servers
// follow the box's routing table; a side with no route out of the bridge
// gets nothing (the dial fails, the client's handshake is never answered).
func checkRoutes(f CheckFacts) []Result {
	var out []Result
	// With no selection on a side, its lookup is the same for both sides:
	// one finding per family, naming the sides it hurts.
	blind := map[int][]string{}
	for _, r := range f.Reach {
		switch {
		case !r.Prefix.IsValid() && r.Via == "":
			blind[r.Family] = append(blind[r.Family], r.Side)
		case r.Prefix.IsValid() && r.Via == "":
			out = append(out, Result{Level: Fail,
				Found: fmt.Sprintf("no route to %s side %s (intercept.%s_cidrs): the proxy cannot reach it", r.Side, r.Prefix, r.Side),
				Fix:   fmt.Sprintf("bridge.routes: add %s via the %s side's router", r.Prefix, r.Side)})
		case r.Prefix.IsValid() && r.Via != f.Bridge:
			out = append(out, Result{Level: Fail,
				Found: fmt.Sprintf("the route to %s side %s (intercept.%s_cidrs) goes out of %s, not %s: the proxy's packets for it leave the wrong way", r.Side, r.Prefix, r.Side, r.Via, f.Bridge),
				Fix:   fmt.Sprintf("bridge.routes: add %s via the %s side's router (a more specific route out of %s)", r.Prefix, r.Side, f.Bridge)})
		}
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		sides := blind[fam]
		if len(sides) == 0 {
			continue
		}
		what := map[string]string{"client": "answer clients", "server": "dial servers"}
		var cannot []string
		for _, s := range sides {
			cannot = append(cannot, what[s])
		}
		out = append(out, Result{Level: Fail,
			Found: fmt.Sprintf("no %s route out of %s: the proxy cannot %s, so %s flows to intercepted ports fail", famName(fam), f.Bridge, strings.Join(cannot, " or "), famName(fam)),
			Fix:   fmt.Sprintf("bridge.addresses (an %s address on the segment) or bridge.routes (the segment's prefixes via %s)", famName(fam), f.Bridge)})
	}
	if len(out) > 0 {
		return out
	}
	return []Result{{Found: fmt.Sprintf("the box has routes to the client and server sides out of %s", f.Bridge)}}
}

// readRouterAdverts is how many router advertisements the bridge has sent
// since it was created, from the kernel's per-interface ICMPv6 counters
// (they count what any program on the box sent out of it). -1 when it
// cannot be read (no bridge, or IPv6 off on it).
func readRouterAdverts(bridgeName string) int {
	b, err := os.ReadFile("/proc/thread-self/net/dev_snmp6/" + bridgeName)
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "Icmp6OutRouterAdvertisements" {
			if n, err := strconv.Atoi(f[1]); err == nil {
				return n
			}
		}
	}
	return -1
}

// checkRouterAdverts: a bump in the wire must not be a router to its
// hosts. A program that advertises the bridge (radvd, dnsmasq's enable-ra,
// systemd-networkd's IPv6SendRA=) makes IPv6 hosts route through the box.
func checkRouterAdverts(f CheckFacts) []Result {
	if f.RouterAdverts <= 0 {
		return []Result{{Found: fmt.Sprintf("%s has sent no IPv6 router advertisements", f.Bridge)}}
	}
	return []Result{{Level: Warn,
		Found: fmt.Sprintf("%s has sent %d IPv6 router advertisements since it was created: a program on the box (radvd, dnsmasq enable-ra, systemd-networkd IPv6SendRA=) advertises it as a router, so hosts on the wire route through the box", f.Bridge, f.RouterAdverts),
		Fix:   fmt.Sprintf("remove %s from that program's configuration (the count starts again when the bridge is re-created)", f.Bridge)}}
}
