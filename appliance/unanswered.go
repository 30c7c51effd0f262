package appliance

import (
	"net/netip"

	"github.com/ghostwire/ghostwire/rules"
)

// bypassUnanswered bridges new connections to and from server untouched
// for bridge.neighbour_timeout, after a connect to it got no answer at all
// on an invisible box.
//
// Why: an invisible box never asks the network for a MAC; it uses what it
// learned from the traffic. A server that changes its MAC without
// announcing it (no gratuitous ARP, no unsolicited NA) leaves the box
// sending to the old one, and the client cannot heal it either: the
// proxy, answering as the server, keeps confirming the client's stale
// neighbour entry. Bridged, the client's own connection attempts go
// unanswered, so the client resolves the server again; the server's reply
// crosses the box, whose ARP/NDP rules learn the new MAC from it; when the
// bypass ends, connections are proxied again, to the right MAC. A server
// that is simply down costs the same as without the box: its clients time
// out either way.
//
// An address already covered by the bypass list is left as it is (an
// operator's entry keeps its own timeout).
func (s *session) bypassUnanswered(server netip.Addr) {
	p := netip.PrefixFrom(server, server.BitLen())
	timeout := s.plan.Config().NeighbourTimeout
	added, err := rules.AddHostBypassIfUncovered(s.nft, s.plan.Config().Name, p, timeout)
	if err != nil {
		s.r.Logger.Error("bypassing a server that does not answer", "server", server, "err", err)
		return
	}
	if !added {
		return
	}
	s.r.Logger.Warn("server did not answer: its new connections cross the bridge untouched for a while",
		"server", server, "for", timeout,
		"why", "an invisible box cannot ask the network for a host's new MAC; the clients can, once they reach the server directly")
}
