package bridge

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
)

// LinkNames are the links the spec builds on, the bridge first: what
// ReadLinks must read for Preflight and MAC.
func (s Spec) LinkNames() []string {
	return append([]string{s.Name}, s.Ports...)
}

// Preflight reports, from links alone (as ReadLinks reads s.LinkNames()),
// why Apply would be refused: a missing NIC, a NIC already in another
// bridge, a bridge name taken by something that is not a bridge, NICs
// carrying addresses (all of them in one *PortAddressesError, after every
// other check has passed). It is the one place these rules live: plan
// runs it on the facts it read, Apply on the kernel of the moment.
func (s Spec) Preflight(links Links) error {
	if err := s.Validate(); err != nil {
		return err
	}
	if l, ok := links[s.Name]; ok && l.Kind != "bridge" {
		return fmt.Errorf("bridge name %q is already used by a %s interface, not a bridge", s.Name, l.Kind)
	}
	var addressed []PortAddresses
	for i, p := range s.Ports {
		l, ok := links[p]
		switch {
		case !ok:
			return fmt.Errorf("NIC %q does not exist", p)
		case l.Kind == "bridge":
			return fmt.Errorf("NIC %q is itself a bridge", p)
		case l.Loopback:
			return fmt.Errorf("NIC %q is a loopback interface", p)
		case len(l.MAC) != 6:
			return fmt.Errorf("NIC %q has no Ethernet address (type %s)", p, l.Kind)
		case l.Master != "" && l.Master != s.Name:
			return fmt.Errorf("NIC %q is already enslaved to %q", p, l.Master)
		case l.Master == s.Name:
			// Already a port of this bridge (a re-apply): any address on
			// it stopped working when it was enslaved, not now.
			continue
		}
		if lost := lostOnEnslave(l.Addresses); len(lost) > 0 {
			addressed = append(addressed, PortAddresses{Port: i, NIC: p, Addrs: lost})
		}
	}
	if len(addressed) > 0 {
		return &PortAddressesError{Ports: addressed}
	}
	return nil
}

// MAC is the bridge's Ethernet address in links: the existing bridge's, or
// the one Apply will give it (the client NIC's, s.Ports[0]). Diverted
// frames are rewritten to it. ok is false if neither link exists.
func (s Spec) MAC(links Links) (_ net.HardwareAddr, ok bool) {
	if l, ok := links[s.Name]; ok {
		return l.MAC, true
	}
	if len(s.Ports) == 0 {
		return nil, false
	}
	if l, ok := links[s.Ports[0]]; ok {
		return l.MAC, true
	}
	return nil, false
}

// preflight is Preflight on the kernel of the moment, for Apply; it
// returns the links it read. The spec is validated before any of its
// names reaches the kernel.
func (s Spec) preflight(h *netlink.Handle) (Links, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	links, err := ReadLinks(h, s.LinkNames()...)
	if err != nil {
		return nil, err
	}
	return links, s.Preflight(links)
}
