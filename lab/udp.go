//go:build linux

package lab

import (
	"net"
	"net/netip"
)

// UDPSessionClosed is the message of the proxy's log line for each UDP
// session that ends.
const UDPSessionClosed = "udp session closed"

// ListenUDP opens a UDP socket inside ns bound to addr ("192.0.2.1:0" for
// a client socket on any free port). network is "udp4" or "udp6".
func ListenUDP(ns *NS, network, addr string) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := ns.Do(func() error {
		a, err := net.ResolveUDPAddr(network, addr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP(network, a)
		return err
	})
	return c, err
}

// UDPSessionLogFor returns the proxy's "udp session closed" lines whose
// client address is from, as the proxy saw it.
func (b *Appliance) UDPSessionLogFor(from netip.AddrPort) []LogLine {
	var out []LogLine
	for _, l := range b.ProxyLog(UDPSessionClosed) {
		if l["client"] == from.String() {
			out = append(out, l)
		}
	}
	return out
}
