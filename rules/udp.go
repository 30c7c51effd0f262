package rules

import (
	"time"

	"github.com/google/nftables"
)

// UDP in the diversion (only with Config.UDPPorts; see bridgeUDPRules and
// inetPrerouting). The bridge redirects a client's datagrams to an
// intercepted UDP port, and the server's answers from it, like TCP's
// frames, and records each client flow in udpflows4/udpflows6. The inet
// table hands datagrams of the proxy's sessions to its session sockets
// and the others to its UDP listener. Every IP fragment on the bridge is
// lifted to the box too, where it is reassembled before the inet table
// sees it: only a datagram's first fragment carries its ports.

const defaultUDPSessionTimeout = 60 * time.Second

// UDPBypass returns the plan for a proxy at its UDP session limit (on) or
// below it again (off): while on, the bridge still redirects the flows in
// its udpflows sets (the sessions the proxy relays; each client frame
// refreshes its entry) and lets every other datagram to or from an
// intercepted UDP port cross untouched, new flows included, for as long as
// it lasts. UDP has no refusal: a refused datagram is a dropped one, so UDP
// always fails open at its limit.
//
// It is orthogonal to the other variants: Overloaded and Draining keep it,
// and UDPBypass keeps theirs. A plan without UDP ports has nothing to
// bypass: UDPBypass of it is the same plan, never reporting IsUDPBypass.
func (p *Plan) UDPBypass(on bool) *Plan {
	v := p.variant
	v.udpBypass = on && len(p.cfg.UDPPorts) > 0
	return newPlan(p.Config(), v)
}

// IsUDPBypass reports whether p comes from UDPBypass(true).
func (p *Plan) IsUDPBypass() bool { return p.udpBypass }

// UDPFlows counts the flows currently in the udpflows sets of the bridge
// table called name (IPv4 and IPv6 together): the UDP flows a client sent
// a datagram on within the plan's UDPSessionTimeout, which the proxy
// relays (or relayed: an entry outlives the session by up to the
// difference of the two timeouts). It is 0 if the table or its sets do not
// exist. Like BypassedFlows it dumps every element (at most 2 × 65536).
func UDPFlows(c *nftables.Conn, name string) (int, error) {
	return countFlows(c, name, udpFlowSets, "UDP flows")
}
