package provision

import (
	"fmt"
	"net/netip"

	"github.com/ghostwire/ghostwire/bridge"
)

// Preflight reports, from f alone, why applying spec would be refused: a
// missing NIC, a NIC already in another bridge, a bridge name taken by
// something that is not a bridge, NICs carrying addresses (all of them in
// one *bridge.PortAddressesError, after every other check has passed).
//
// It asks what bridge.Spec.Preflight asks of the kernel, in the same order
// and words, so plan refuses exactly what apply refuses; Spec.Apply still
// runs its own against the kernel of the moment.
func Preflight(spec bridge.Spec, f Facts) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if l, ok := f.Links[spec.Name]; ok && l.Kind != "bridge" {
		return fmt.Errorf("bridge name %q is already used by a %s interface, not a bridge", spec.Name, l.Kind)
	}
	var addressed []bridge.PortAddresses
	for i, p := range spec.Ports {
		l, ok := f.Links[p]
		switch {
		case !ok:
			return fmt.Errorf("NIC %q does not exist", p)
		case l.Kind == "bridge":
			return fmt.Errorf("NIC %q is itself a bridge", p)
		case l.Loopback:
			return fmt.Errorf("NIC %q is a loopback interface", p)
		case len(l.MAC) != 6:
			return fmt.Errorf("NIC %q has no Ethernet address (type %s)", p, l.Kind)
		case l.Master != "" && l.Master != spec.Name:
			return fmt.Errorf("NIC %q is already enslaved to %q", p, l.Master)
		case l.Master == spec.Name:
			// Already a port of this bridge (a re-apply): any address on
			// it stopped working when it was enslaved, not now.
			continue
		}
		if lost := lostOnEnslave(l.Addresses); len(lost) > 0 {
			addressed = append(addressed, bridge.PortAddresses{Port: i, NIC: p, Addrs: lost})
		}
	}
	if len(addressed) > 0 {
		return &bridge.PortAddressesError{Ports: addressed}
	}
	return nil
}

// lostOnEnslave picks the addresses that enslaving their NIC would take out
// of service. IPv6 link-local addresses are left out: the kernel gives one
// to every link that comes up, so refusing them would refuse every NIC
// that is up (bridge/portaddr.go says the same of its own copy).
func lostOnEnslave(addrs []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range addrs {
		a := p.Addr()
		if a.Is6() && (a.IsLinkLocalUnicast() || a.IsLoopback() || a.IsUnspecified()) {
			continue
		}
		out = append(out, p)
	}
	return out
}
