package bridge

import (
	"fmt"
	"net/netip"
	"strings"
)

// PortAddresses are the addresses one NIC carries that would stop working
// once Apply enslaves it.
type PortAddresses struct {
	Port  int // index in Spec.Ports: 0 is the client NIC, 1 the server NIC
	NIC   string
	Addrs []netip.Prefix
}

// PortAddressesError refuses NICs that carry addresses. A bridge port hands
// every frame it receives to the bridge, so an address left on the port no
// longer answers: whoever managed the box through it is cut off, silently.
type PortAddressesError struct {
	Ports []PortAddresses
	// PortNames name Spec.Ports[i], and AddressesName the bridge's address
	// list, in the words the operator used (appliance sets its config
	// keys); empty means generic wording.
	PortNames     [2]string
	AddressesName string
}

func (e *PortAddressesError) Error() string {
	names := e.PortNames
	if names == ([2]string{}) {
		names = [2]string{"client NIC", "server NIC"}
	}
	list := e.AddressesName
	if list == "" {
		list = "the bridge's addresses"
	}
	var nics []string
	n := 0
	for _, p := range e.Ports {
		addrs := make([]string, len(p.Addrs))
		for i, a := range p.Addrs {
			addrs[i] = a.String()
		}
		nics = append(nics, fmt.Sprintf("%s %s carries %s", names[p.Port], p.NIC, strings.Join(addrs, ", ")))
		n += len(p.Addrs)
	}
	it := "it"
	if n > 1 {
		it = "them"
	}
	return fmt.Sprintf("%s: an enslaved port's addresses stop working; remove %s, or move %s to the bridge by listing %s under %s",
		strings.Join(nics, "; "), it, it, it, list)
}

// lostOnEnslave picks the addresses that enslaving their NIC would take out
// of service. IPv6 link-local addresses are left out: the kernel gives one
// to every link that comes up (veths, ports and the bridge itself, which
// with the client NIC's MAC even gets the same one), so refusing them would
// refuse every NIC that is up.
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
