package bridge

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Apply builds the bridge and reports whether it had to create it. It is
// idempotent: on an already built bridge it changes nothing. It does not
// roll back; callers use Remove.
func (s Spec) Apply(h *netlink.Handle) (created bool, err error) {
	created, err = s.Build(h)
	if err != nil {
		return created, err
	}
	return created, s.Up(h)
}

// Build is the first half of Apply: the bridge created (down, when new)
// with its ports enslaved and, if Invisible, its silence configured, so
// what must be in place before the bridge first comes up can be put
// there (rules.Quiet: a bridge with IPv6 sends MLD reports as soon as it
// is up). Idempotent.
func (s Spec) Build(h *netlink.Handle) (created bool, err error) {
	links, err := s.preflight(h)
	if err != nil {
		return false, err
	}
	mac, _ := s.MAC(links) // Preflight found the client NIC
	br, created, err := s.ensureBridge(h, mac)
	if err != nil {
		return created, err
	}
	if s.Invisible {
		if err := s.silence(h, br); err != nil {
			return created, err
		}
	}
	for _, p := range s.Ports {
		l, err := h.LinkByName(p)
		if err != nil {
			return created, fmt.Errorf("looking up NIC %s: %w", p, err)
		}
		if s.Invisible {
			if err := quietPort(h, l); err != nil {
				return created, err
			}
		}
		if l.Attrs().MasterIndex != br.Attrs().Index {
			if err := h.LinkSetMaster(l, br); err != nil {
				return created, fmt.Errorf("enslaving NIC %s to %s: %w", p, s.Name, err)
			}
		}
	}
	return created, nil
}

// silence turns off what makes a bridge speak for itself: ARP (with
// IFF_NOARP every neighbour of the box resolves to the bridge's own MAC,
// which the owned egress rules rewrite) and the IPv6 link-local address
// (no DAD, no MLD from it). Multicast snooping is set off when the
// bridge is created (ensureBridge).
func (s Spec) silence(h *netlink.Handle, br netlink.Link) error {
	if br.Attrs().RawFlags&unix.IFF_NOARP == 0 {
		if err := h.LinkSetARPOff(br); err != nil {
			return fmt.Errorf("turning ARP off on %s: %w", s.Name, err)
		}
	}
	if err := h.LinkSetIP6AddrGenMode(br, IP6AddrGenModeNone); err != nil {
		return fmt.Errorf("setting addrgenmode none on %s: %w", s.Name, err)
	}
	return nil
}

// quietPort takes a port that is up with IPv6 on down, until Up: a port
// with IPv6 sends MLD reports from its own MAC, past the bridge's egress,
// and one that is down sends nothing while its IPv6 is turned off
// (Sysctls). A port already without IPv6 keeps running.
func quietPort(h *netlink.Handle, l netlink.Link) error {
	if l.Attrs().Flags&net.FlagUp == 0 {
		return nil
	}
	addrs, err := RetryDump(func() ([]netlink.Addr, error) { return h.AddrList(l, netlink.FAMILY_V6) })
	if err != nil {
		return fmt.Errorf("listing IPv6 addresses of %s: %w", l.Attrs().Name, err)
	}
	if len(addrs) == 0 {
		return nil
	}
	if err := h.LinkSetDown(l); err != nil {
		return fmt.Errorf("taking NIC %s down to turn its IPv6 off: %w", l.Attrs().Name, err)
	}
	return nil
}

// IP6AddrGenModeNone is IN6_ADDR_GEN_MODE_NONE: no link-local address.
const IP6AddrGenModeNone = 1

// Up is the second half of Apply: ports and bridge up, then the
// addresses and routes. Idempotent.
func (s Spec) Up(h *netlink.Handle) error {
	br, err := h.LinkByName(s.Name)
	if err != nil {
		return fmt.Errorf("looking up bridge %s: %w", s.Name, err)
	}
	for _, p := range s.Ports {
		l, err := h.LinkByName(p)
		if err != nil {
			return fmt.Errorf("looking up NIC %s: %w", p, err)
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			if err := h.LinkSetUp(l); err != nil {
				return fmt.Errorf("bringing NIC %s up: %w", p, err)
			}
		}
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return fmt.Errorf("bringing bridge %s up: %w", s.Name, err)
		}
	}
	for _, a := range s.Addresses {
		addr := &netlink.Addr{IPNet: prefixIPNet(a)}
		if err := h.AddrReplace(br, addr); err != nil {
			return fmt.Errorf("adding address %s to %s: %w", a, s.Name, err)
		}
	}
	for _, r := range s.sortedRoutes() {
		if err := ensureRoute(h, br, r); err != nil {
			return err
		}
	}
	return nil
}

// ensureBridge creates the bridge with mac if missing (tolerating EEXIST
// from a race) and reads it back to make sure it really is a bridge.
func (s Spec) ensureBridge(h *netlink.Handle, mac net.HardwareAddr) (netlink.Link, bool, error) {
	created := false
	if _, err := h.LinkByName(s.Name); isNotFound(err) {
		// STP stays off (the kernel default), so ports forward at once.
		// The MAC is set explicitly so it stays put whatever ports come
		// and go: the diversion rules carry it as a literal.
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: s.Name, HardwareAddr: mac}}
		if s.Invisible {
			// Without snooping the bridge sends no queries of its own
			// and keeps no state from the hosts' reports.
			br.MulticastSnooping = ref(false)
		}
		if err := h.LinkAdd(br); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, false, fmt.Errorf("creating bridge %s: %w", s.Name, err)
		}
		created = true
	}
	l, err := h.LinkByName(s.Name)
	if err != nil {
		return nil, created, fmt.Errorf("reading back bridge %s: %w", s.Name, err)
	}
	if _, ok := l.(*netlink.Bridge); !ok {
		return nil, created, fmt.Errorf("%s already exists but is a %s, not a bridge", s.Name, l.Type())
	}
	return l, created, nil
}

// sortedRoutes puts on-link routes first: a gateway is only reachable once
// the route to its subnet exists.
func (s Spec) sortedRoutes() []Route {
	rs := slices.Clone(s.Routes)
	slices.SortStableFunc(rs, func(a, b Route) int {
		switch {
		case !a.Via.IsValid() && b.Via.IsValid():
			return -1
		case a.Via.IsValid() && !b.Via.IsValid():
			return 1
		}
		return 0
	})
	return rs
}

func (r Route) netlink(linkIndex int) *netlink.Route {
	nr := &netlink.Route{LinkIndex: linkIndex, Dst: prefixIPNet(r.Dst), Scope: netlink.SCOPE_LINK}
	if r.Via.IsValid() {
		nr.Gw = net.IP(r.Via.AsSlice())
		nr.Scope = netlink.SCOPE_UNIVERSE
	}
	return nr
}

// ensureRoute adds the route; an identical route already on the bridge is
// fine, a route to the same destination elsewhere is the operator's and is
// refused rather than replaced.
func ensureRoute(h *netlink.Handle, br netlink.Link, r Route) error {
	err := h.RouteAdd(r.netlink(br.Attrs().Index))
	if err == nil || !errors.Is(err, unix.EEXIST) {
		if err != nil {
			return fmt.Errorf("adding route %s dev %s: %w", r, br.Attrs().Name, err)
		}
		return nil
	}
	if ok, err := hasRoute(h, br.Attrs().Index, br.Attrs().Name, r); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("adding route %s dev %s: a route to %s already exists on another interface", r, br.Attrs().Name, r.Dst)
	}
	return nil
}

// hasRoute reports whether the bridge (index and name) has route r in
// the main table.
func hasRoute(h *netlink.Handle, index int, name string, r Route) (bool, error) {
	want := r.netlink(index)
	family := netlink.FAMILY_V4
	if r.Dst.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	routes, err := RetryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(family, &netlink.Route{LinkIndex: index}, netlink.RT_FILTER_OIF)
	})
	if err != nil {
		return false, fmt.Errorf("listing routes on %s: %w", name, err)
	}
	for _, got := range routes {
		if got.Dst == nil && r.Dst.Bits() != 0 || got.Table != unix.RT_TABLE_MAIN {
			continue
		}
		if (got.Dst == nil || got.Dst.String() == want.Dst.String()) && got.Gw.Equal(want.Gw) {
			return true, nil
		}
	}
	return false, nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ref[T any](v T) *T { return &v }
