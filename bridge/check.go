package bridge

import (
	"fmt"
	"slices"

	"github.com/vishvananda/netlink"
)

// Check lists how the kernel differs from the spec; empty means in place.
// It decides the bridge, ports and addresses from links (as ReadLinks
// reads s.LinkNames(), like Preflight) and reads only the routes through h.
func (s Spec) Check(h *netlink.Handle, links Links) ([]string, error) {
	drift, ok := s.linkDrift(links)
	if !ok {
		return drift, nil
	}
	br := links[s.Name]
	for _, r := range s.Routes {
		ok, err := hasRoute(h, br.Index, s.Name, r)
		if err != nil {
			return nil, err
		}
		if !ok {
			drift = append(drift, fmt.Sprintf("route %s dev %s missing", r, s.Name))
		}
	}
	return drift, nil
}

// linkDrift lists how links differ from the spec's bridge, ports and
// addresses; ok is false if there is no bridge to look further into (no
// link of its name, or one that is not a bridge).
func (s Spec) linkDrift(links Links) (drift []string, ok bool) {
	br, ok := links[s.Name]
	if !ok {
		return []string{fmt.Sprintf("bridge %s is missing", s.Name)}, false
	}
	if br.Kind != "bridge" {
		return []string{fmt.Sprintf("%s is a %s, not a bridge", s.Name, br.Kind)}, false
	}
	if !br.Up {
		drift = append(drift, fmt.Sprintf("bridge %s is down", s.Name))
	}
	for _, p := range s.Ports {
		l, ok := links[p]
		switch {
		case !ok:
			drift = append(drift, fmt.Sprintf("NIC %s is missing", p))
		case l.Master != s.Name:
			drift = append(drift, fmt.Sprintf("NIC %s is not a port of %s", p, s.Name))
		case !l.Up:
			drift = append(drift, fmt.Sprintf("NIC %s is down", p))
		}
	}
	for _, a := range s.Addresses {
		if !slices.Contains(br.Addresses, a) {
			drift = append(drift, fmt.Sprintf("address %s missing on %s", a, s.Name))
		}
	}
	if s.Invisible {
		drift = append(drift, s.Speaking(br)...)
	}
	return drift, true
}

// Speaking lists what would make an invisible bridge br send frames of
// its own.
func (s Spec) Speaking(br Link) []string {
	var drift []string
	if !br.NoARP {
		drift = append(drift, fmt.Sprintf("bridge %s has ARP on (want arp off)", s.Name))
	}
	for _, a := range br.Addresses {
		if a.Addr().Is6() && a.Addr().IsLinkLocalUnicast() {
			drift = append(drift, fmt.Sprintf("bridge %s has an IPv6 link-local address %s (want addrgenmode none)", s.Name, a))
		}
	}
	return drift
}
