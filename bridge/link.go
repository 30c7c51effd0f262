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

// PortState is what a NIC looked like before ghostwire touched it, so that
// Remove can put it back.
type PortState struct {
	Name   string `json:"name"`
	Up     bool   `json:"up"`
	Master string `json:"master,omitempty"` // bridge it was already in, if any
}

// Observe records the current state of the named NICs.
func Observe(h *netlink.Handle, names []string) ([]PortState, error) {
	var out []PortState
	for _, n := range names {
		l, err := h.LinkByName(n)
		if err != nil {
			return nil, fmt.Errorf("reading NIC %s: %w", n, err)
		}
		ps := PortState{Name: n, Up: l.Attrs().Flags&net.FlagUp != 0}
		if m := l.Attrs().MasterIndex; m != 0 {
			if ml, err := h.LinkByIndex(m); err == nil {
				ps.Master = ml.Attrs().Name
			}
		}
		out = append(out, ps)
	}
	return out, nil
}

// Preflight reports, without changing anything, why Apply would be refused:
// a missing NIC, a NIC already in another bridge, a bridge name taken by
// something that is not a bridge, NICs carrying addresses (all of them in
// one *PortAddressesError, after every other check has passed).
func (s Spec) Preflight(h *netlink.Handle) error {
	if err := s.Validate(); err != nil {
		return err
	}
	if l, err := h.LinkByName(s.Name); err == nil {
		if _, ok := l.(*netlink.Bridge); !ok {
			return fmt.Errorf("bridge name %q is already used by a %s interface, not a bridge", s.Name, l.Type())
		}
	} else if !isNotFound(err) {
		return fmt.Errorf("looking up bridge %s: %w", s.Name, err)
	}
	var addressed []PortAddresses
	for i, p := range s.Ports {
		l, err := h.LinkByName(p)
		if isNotFound(err) {
			return fmt.Errorf("NIC %q does not exist", p)
		} else if err != nil {
			return fmt.Errorf("looking up NIC %s: %w", p, err)
		}
		switch l.(type) {
		case *netlink.Bridge:
			return fmt.Errorf("NIC %q is itself a bridge", p)
		}
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			return fmt.Errorf("NIC %q is a loopback interface", p)
		}
		if len(l.Attrs().HardwareAddr) != 6 {
			return fmt.Errorf("NIC %q has no Ethernet address (type %s)", p, l.Type())
		}
		if m := l.Attrs().MasterIndex; m != 0 {
			ml, err := h.LinkByIndex(m)
			if err != nil {
				return fmt.Errorf("looking up master of NIC %s: %w", p, err)
			}
			if ml.Attrs().Name != s.Name {
				return fmt.Errorf("NIC %q is already enslaved to %q", p, ml.Attrs().Name)
			}
			// Already a port of this bridge (a re-apply): any address on
			// it stopped working when it was enslaved, not now.
			continue
		}
		addrs, err := nicAddresses(h, l)
		if err != nil {
			return err
		}
		if lost := lostOnEnslave(addrs); len(lost) > 0 {
			addressed = append(addressed, PortAddresses{Port: i, NIC: p, Addrs: lost})
		}
	}
	if len(addressed) > 0 {
		return &PortAddressesError{Ports: addressed}
	}
	return nil
}

// MAC is the bridge's Ethernet address: the existing bridge's, or the one
// Apply will give it (the client NIC's). Diverted frames are rewritten to it.
func (s Spec) MAC(h *netlink.Handle) (net.HardwareAddr, error) {
	if l, err := h.LinkByName(s.Name); err == nil {
		return l.Attrs().HardwareAddr, nil
	}
	l, err := h.LinkByName(s.Ports[0])
	if err != nil {
		return nil, fmt.Errorf("reading MAC of NIC %s: %w", s.Ports[0], err)
	}
	return l.Attrs().HardwareAddr, nil
}

// Apply builds the bridge and reports whether it had to create it. It is
// idempotent: on an already built bridge it changes nothing. It does not
// roll back; callers use Remove.
func (s Spec) Apply(h *netlink.Handle) (created bool, err error) {
	if err := s.Preflight(h); err != nil {
		return false, err
	}
	br, created, err := s.ensureBridge(h)
	if err != nil {
		return created, err
	}
	for _, p := range s.Ports {
		l, err := h.LinkByName(p)
		if err != nil {
			return created, fmt.Errorf("looking up NIC %s: %w", p, err)
		}
		if l.Attrs().MasterIndex != br.Attrs().Index {
			if err := h.LinkSetMaster(l, br); err != nil {
				return created, fmt.Errorf("enslaving NIC %s to %s: %w", p, s.Name, err)
			}
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			if err := h.LinkSetUp(l); err != nil {
				return created, fmt.Errorf("bringing NIC %s up: %w", p, err)
			}
		}
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return created, fmt.Errorf("bringing bridge %s up: %w", s.Name, err)
		}
	}
	for _, a := range s.Addresses {
		addr := &netlink.Addr{IPNet: prefixIPNet(a)}
		if err := h.AddrReplace(br, addr); err != nil {
			return created, fmt.Errorf("adding address %s to %s: %w", a, s.Name, err)
		}
	}
	for _, r := range s.sortedRoutes() {
		if err := ensureRoute(h, br, r); err != nil {
			return created, err
		}
	}
	return created, nil
}

// ensureBridge creates the bridge if missing (tolerating EEXIST from a race)
// and reads it back to make sure it really is a bridge.
func (s Spec) ensureBridge(h *netlink.Handle) (netlink.Link, bool, error) {
	created := false
	if _, err := h.LinkByName(s.Name); isNotFound(err) {
		mac, err := s.MAC(h)
		if err != nil {
			return nil, false, err
		}
		// STP stays off (the kernel default), so ports forward at once.
		// The MAC is set explicitly so it stays put whatever ports come
		// and go: the diversion rules carry it as a literal.
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: s.Name, HardwareAddr: mac}}
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

func (r Route) netlink(link netlink.Link) *netlink.Route {
	nr := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: prefixIPNet(r.Dst), Scope: netlink.SCOPE_LINK}
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
	err := h.RouteAdd(r.netlink(br))
	if err == nil || !errors.Is(err, unix.EEXIST) {
		if err != nil {
			return fmt.Errorf("adding route %s dev %s: %w", r, br.Attrs().Name, err)
		}
		return nil
	}
	if ok, err := hasRoute(h, br, r); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("adding route %s dev %s: a route to %s already exists on another interface", r, br.Attrs().Name, r.Dst)
	}
	return nil
}

func hasRoute(h *netlink.Handle, br netlink.Link, r Route) (bool, error) {
	want := r.netlink(br)
	family := netlink.FAMILY_V4
	if r.Dst.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	var routes []netlink.Route
	err := retryDump(func() (err error) {
		routes, err = h.RouteListFiltered(family, &netlink.Route{LinkIndex: br.Attrs().Index}, netlink.RT_FILTER_OIF)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("listing routes on %s: %w", br.Attrs().Name, err)
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

// Remove undoes Apply. If ghostwire created the bridge it deletes it (which
// releases the ports and drops its addresses and routes); otherwise it only
// removes its own addresses and routes and releases the ports it enslaved.
// NICs get back the up/down state recorded in ports. Safe to repeat.
func (s Spec) Remove(h *netlink.Handle, ports []PortState, createdBridge bool) error {
	var errs []error
	br, err := h.LinkByName(s.Name)
	switch {
	case isNotFound(err):
	case err != nil:
		errs = append(errs, fmt.Errorf("looking up bridge %s: %w", s.Name, err))
	case createdBridge:
		if err := h.LinkDel(br); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting bridge %s: %w", s.Name, err))
		}
	default:
		for _, r := range s.Routes {
			if err := h.RouteDel(r.netlink(br)); err != nil && !isNotFound(err) && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("deleting route %s: %w", r, err))
			}
		}
		for _, a := range s.Addresses {
			if err := h.AddrDel(br, &netlink.Addr{IPNet: prefixIPNet(a)}); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("deleting address %s: %w", a, err))
			}
		}
	}
	for _, ps := range ports {
		l, err := h.LinkByName(ps.Name)
		if isNotFound(err) {
			continue // the NIC went away; nothing to restore
		} else if err != nil {
			errs = append(errs, fmt.Errorf("looking up NIC %s: %w", ps.Name, err))
			continue
		}
		if ps.Master == "" && l.Attrs().MasterIndex != 0 && br != nil && l.Attrs().MasterIndex == br.Attrs().Index {
			if err := h.LinkSetNoMaster(l); err != nil {
				errs = append(errs, fmt.Errorf("releasing NIC %s: %w", ps.Name, err))
			}
		}
		if !ps.Up && l.Attrs().Flags&net.FlagUp != 0 {
			if err := h.LinkSetDown(l); err != nil {
				errs = append(errs, fmt.Errorf("restoring NIC %s down: %w", ps.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Check lists how the kernel differs from the spec; empty means in place.
func (s Spec) Check(h *netlink.Handle) ([]string, error) {
	l, err := h.LinkByName(s.Name)
	if isNotFound(err) {
		return []string{fmt.Sprintf("bridge %s is missing", s.Name)}, nil
	} else if err != nil {
		return nil, fmt.Errorf("looking up bridge %s: %w", s.Name, err)
	}
	var drift []string
	if _, ok := l.(*netlink.Bridge); !ok {
		return []string{fmt.Sprintf("%s is a %s, not a bridge", s.Name, l.Type())}, nil
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		drift = append(drift, fmt.Sprintf("bridge %s is down", s.Name))
	}
	for _, p := range s.Ports {
		pl, err := h.LinkByName(p)
		switch {
		case isNotFound(err):
			drift = append(drift, fmt.Sprintf("NIC %s is missing", p))
		case err != nil:
			return nil, fmt.Errorf("looking up NIC %s: %w", p, err)
		case pl.Attrs().MasterIndex != l.Attrs().Index:
			drift = append(drift, fmt.Sprintf("NIC %s is not a port of %s", p, s.Name))
		case pl.Attrs().Flags&net.FlagUp == 0:
			drift = append(drift, fmt.Sprintf("NIC %s is down", p))
		}
	}
	var addrs []netlink.Addr
	if err := retryDump(func() (err error) { addrs, err = h.AddrList(l, netlink.FAMILY_ALL); return err }); err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", s.Name, err)
	}
	for _, a := range s.Addresses {
		if !slices.ContainsFunc(addrs, func(x netlink.Addr) bool { return x.IPNet.String() == prefixIPNet(a).String() }) {
			drift = append(drift, fmt.Sprintf("address %s missing on %s", a, s.Name))
		}
	}
	for _, r := range s.Routes {
		ok, err := hasRoute(h, l, r)
		if err != nil {
			return nil, err
		}
		if !ok {
			drift = append(drift, fmt.Sprintf("route %s dev %s missing", r, s.Name))
		}
	}
	return drift, nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}

// retryDump reruns a netlink dump that the kernel interrupted because the
// table changed underneath it.
func retryDump(f func() error) error {
	var err error
	for range 5 {
		if err = f(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return err
}
