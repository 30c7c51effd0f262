// Package bridge builds and removes ghostwire's Linux bridge over two NICs, with its addresses, routes and sysctls.
package bridge

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Spec is the bridge ghostwire wants: Name over exactly two ports, the
// client-facing NIC first, plus optional management addresses and routes.
type Spec struct {
	Name      string
	Ports     []string // [client NIC, server NIC]
	Addresses []netip.Prefix
	Routes    []Route
	// Invisible makes the bridge say nothing of its own on the wire: no
	// ARP (IFF_NOARP), no IPv6 link-local address (addrgenmode none), no
	// multicast snooping, and IPv6 off on the ports (Sysctls). What it
	// still tries to send (MLD, DAD, ICMP errors) is dropped on its
	// egress by rules.Quiet, which must be in place before it is up.
	Invisible bool
}

// Route is a route ghostwire puts on the bridge. A zero Via means on-link.
type Route struct {
	Dst netip.Prefix
	Via netip.Addr
}

// ParseRoute reads "192.0.2.0/24", "2001:db8::/64", "default via 192.0.2.1"
// or "198.51.100.0/24 via 192.0.2.1".
func ParseRoute(s string) (Route, error) {
	f := strings.Fields(s)
	if len(f) != 1 && !(len(f) == 3 && f[1] == "via") {
		return Route{}, fmt.Errorf("route %q: want \"DST\" or \"DST via GATEWAY\"", s)
	}
	var r Route
	if len(f) == 3 {
		gw, err := netip.ParseAddr(f[2])
		if err != nil {
			return Route{}, fmt.Errorf("route %q: bad gateway: %w", s, err)
		}
		r.Via = gw
	}
	if f[0] == "default" {
		if !r.Via.IsValid() {
			return Route{}, fmt.Errorf("route %q: default route needs \"via GATEWAY\"", s)
		}
		r.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if r.Via.Is6() {
			r.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return r, nil
	}
	dst, err := netip.ParsePrefix(f[0])
	if err != nil {
		return Route{}, fmt.Errorf("route %q: bad destination: %w", s, err)
	}
	if dst != dst.Masked() {
		return Route{}, fmt.Errorf("route %q: destination has host bits set (did you mean %s?)", s, dst.Masked())
	}
	r.Dst = dst
	if r.Via.IsValid() && r.Via.Is4() != dst.Addr().Is4() {
		return Route{}, fmt.Errorf("route %q: gateway and destination are different IP families", s)
	}
	return r, nil
}

func (r Route) String() string {
	dst := r.Dst.String()
	if r.Dst.Bits() == 0 {
		dst = "default"
	}
	if r.Via.IsValid() {
		return dst + " via " + r.Via.String()
	}
	return dst
}

// Validate checks the spec without looking at the kernel.
func (s Spec) Validate() error {
	if err := validName("bridge name", s.Name); err != nil {
		return err
	}
	if len(s.Ports) != 2 {
		return fmt.Errorf("bridge %s: need exactly two NICs (client and server), got %d", s.Name, len(s.Ports))
	}
	for _, p := range s.Ports {
		if err := validName("NIC name", p); err != nil {
			return err
		}
		if p == s.Name {
			return fmt.Errorf("NIC %q: is the bridge's own name", p)
		}
	}
	if s.Ports[0] == s.Ports[1] {
		return fmt.Errorf("client NIC and server NIC are the same interface %q", s.Ports[0])
	}
	for _, a := range s.Addresses {
		if !a.IsValid() || a.Addr().IsUnspecified() || a.Addr().IsMulticast() {
			return fmt.Errorf("bridge address %s: not a usable unicast address", a)
		}
	}
	for _, r := range s.Routes {
		if !r.Dst.IsValid() {
			return errors.New("route with no destination")
		}
	}
	return nil
}

func validName(what, n string) error {
	if err := ValidIfName(n); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// String renders the spec as the iproute2 commands that would build it.
func (s Spec) String() string {
	var b strings.Builder
	if s.Invisible {
		fmt.Fprintf(&b, "ip link add %s type bridge mcast_snooping 0\n", s.Name)
		fmt.Fprintf(&b, "ip link set %s arp off addrgenmode none\n", s.Name)
	} else {
		fmt.Fprintf(&b, "ip link add %s type bridge\n", s.Name)
	}
	for _, p := range s.Ports {
		fmt.Fprintf(&b, "ip link set %s master %s up\n", p, s.Name)
	}
	fmt.Fprintf(&b, "ip link set %s up\n", s.Name)
	for _, a := range s.Addresses {
		fmt.Fprintf(&b, "ip addr add %s dev %s\n", a, s.Name)
	}
	for _, r := range s.Routes {
		fmt.Fprintf(&b, "ip route add %s dev %s\n", r, s.Name)
	}
	return b.String()
}
