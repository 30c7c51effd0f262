package bridge

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

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
			if err := h.RouteDel(r.netlink(br.Attrs().Index)); err != nil && !isNotFound(err) && !errors.Is(err, unix.ESRCH) {
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
