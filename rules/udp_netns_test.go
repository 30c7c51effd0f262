package rules

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
	"golang.org/x/sys/unix"
)

// The UDP plans on real traffic, in the overload lab (no proxy listening:
// a lifted datagram finds no socket and is routed by the box, which is
// what tells it from a bridged one).

const (
	labUDPPort   = 5353 // intercepted UDP port the lab's server echoes on
	labOtherPort = 7007 // a UDP port nobody intercepts, echoed too
)

// udpPlan is the lab's plan intercepting labUDPPort too.
func (ol *overloadLab) udpPlan(t *testing.T) *Plan {
	t.Helper()
	cfg := ol.plan.Config()
	cfg.UDPPorts, cfg.ProxyUDPPort = []uint16{labUDPPort}, 3130
	return mustPlan(t, cfg)
}

// udpEcho echoes datagrams on port, IPv4 and IPv6, in the server.
func (ol *overloadLab) udpEcho(t *testing.T, port uint16) {
	t.Helper()
	for _, addr := range []netip.Addr{ol.ServerIP4, ol.ServerIP6} {
		var c *net.UDPConn
		if err := ol.Server.Do(func() (err error) {
			c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, port)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				_, _ = c.WriteToUDPAddrPort(buf[:n], from)
			}
		}()
	}
}

// udpClient is a client socket connected to server:port, sending with TTL
// (hop limit) clientTTL.
func (ol *overloadLab) udpClient(t *testing.T, server netip.Addr, port uint16) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ol.Client.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(server, port)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if server.Is6() {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, clientTTL)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, clientTTL)
		}
	}); err != nil || serr != nil {
		t.Fatal(errors.Join(err, serr))
	}
	return c
}

// udpRoundTrip sends msg and reads its echo back.
func udpRoundTrip(c *net.UDPConn, msg []byte) error {
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("sending %d bytes: %w", len(msg), err)
	}
	got := make([]byte, len(msg)+1)
	n, err := c.Read(got)
	if err != nil {
		return fmt.Errorf("reading the echo of %d bytes: %w", len(msg), err)
	}
	if !bytes.Equal(got[:n], msg) {
		return fmt.Errorf("echo of %d bytes came back as %d different ones", len(msg), n)
	}
	return nil
}

// captureUDP records how c's datagrams (every fragment of them: the ones
// after the first carry no ports) reached the server while they round-trip.
func (ol *overloadLab) captureUDP(t *testing.T, c *net.UDPConn, msgs ...[]byte) hop {
	t.Helper()
	local := c.LocalAddr().(*net.UDPAddr).AddrPort()
	remote := c.RemoteAddr().(*net.UDPAddr).AddrPort()
	return ol.captureFrames(t, func() {
		for _, msg := range msgs {
			if err := udpRoundTrip(c, msg); err != nil {
				t.Fatal(err)
			}
		}
	}, func(f lab.Frame) bool {
		first := f.SrcPort == local.Port() && f.DstPort == remote.Port()
		return f.Proto == lab.ProtoUDP && f.Src == local.Addr() && f.Dst == remote.Addr() && (first || f.SrcPort == 0)
	})
}

// udpFlowElement is c's flow as nft lists it in a udpflows set.
func udpFlowElement(c *net.UDPConn) string {
	local := c.LocalAddr().(*net.UDPAddr).AddrPort()
	remote := c.RemoteAddr().(*net.UDPAddr).AddrPort()
	return fmt.Sprintf("%s . %s . %d . %d ", local.Addr(), remote.Addr(), local.Port(), remote.Port())
}

// udpFlowsSet lists the udpflows set of the family of addr in the box.
func (ol *overloadLab) udpFlowsSet(t *testing.T, addr netip.Addr) string {
	t.Helper()
	set := udpFlowSets.name(ipFamilies[0])
	if addr.Is6() {
		set = udpFlowSets.name(ipFamilies[1])
	}
	out, err := ol.Box.Command(t.Context(), "nft", "list", "set", "bridge", ol.plan.cfg.Name, set).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list set %s: %v: %s", set, err, out)
	}
	return string(out)
}

// TestUDPTraffic: under the UDP plan a datagram to an intercepted port is
// lifted to the box (here routed, with no proxy) and its flow recorded;
// under UDPBypass a new flow crosses the bridge untouched while the
// recorded one is still lifted.
func TestUDPTraffic(t *testing.T) {
	ol := newOverloadLab(t)
	ol.udpEcho(t, labUDPPort)
	p := ol.udpPlan(t)
	for _, server := range []netip.Addr{ol.ServerIP4, ol.ServerIP6} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[server.Is6()], func(t *testing.T) {
			ol.apply(t, p)
			old := ol.udpClient(t, server, labUDPPort)
			if h := ol.captureUDP(t, old, []byte("normal")); !h.routed(ol.brMAC) {
				t.Errorf("under the UDP plan the server got %v; want routed (box MAC %s, TTL %d)", h, ol.brMAC, clientTTL-1)
			}
			if set := ol.udpFlowsSet(t, server); !strings.Contains(set, udpFlowElement(old)) {
				t.Errorf("flow %s not recorded:\n%s", udpFlowElement(old), set)
			}

			ol.apply(t, p.UDPBypass(true))
			fresh := ol.udpClient(t, server, labUDPPort)
			if h := ol.captureUDP(t, fresh, []byte("bypassed")); !h.bridged(ol.ClientMAC) {
				t.Errorf("a new flow under UDPBypass reached the server as %v; want bridged (client MAC %s, TTL %d)", h, ol.ClientMAC, clientTTL)
			}
			if set := ol.udpFlowsSet(t, server); strings.Contains(set, udpFlowElement(fresh)) {
				t.Errorf("a flow bypassed under UDPBypass was recorded:\n%s", set)
			}
			if h := ol.captureUDP(t, old, []byte("still diverted")); !h.routed(ol.brMAC) {
				t.Errorf("a recorded flow under UDPBypass reached the server as %v; want still lifted (routed: box MAC %s, TTL %d)", h, ol.brMAC, clientTTL-1)
			}
		})
	}
	if n, err := UDPFlows(ol.nft, ol.plan.cfg.Name); err != nil || n != 2 {
		t.Errorf("UDPFlows = %d, %v; want 2 (one IPv4, one IPv6)", n, err)
	}
}

// TestUDPPlanLiftsFragments: a datagram larger than the MTU crosses as IP
// fragments. The TCP-only plan bridges them; with UDP intercepted, every
// fragment is lifted to the box, reassembled and (on a port nobody
// intercepts) routed, and the datagram arrives whole both ways, while an
// unfragmented datagram to that port is still bridged.
func TestUDPPlanLiftsFragments(t *testing.T) {
	ol := newOverloadLab(t)
	ol.udpEcho(t, labOtherPort)
	big := bytes.Repeat([]byte("0123456789abcdef"), 250) // 4000 bytes: three fragments at MTU 1500
	for _, server := range []netip.Addr{ol.ServerIP4, ol.ServerIP6} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[server.Is6()], func(t *testing.T) {
			ol.apply(t, ol.plan)
			c := ol.udpClient(t, server, labOtherPort)
			if h := ol.captureUDP(t, c, big); !h.bridged(ol.ClientMAC) || h.frames < 3 {
				t.Errorf("under the TCP-only plan the fragments reached the server as %v; want 3 or more bridged (client MAC %s, TTL %d)", h, ol.ClientMAC, clientTTL)
			}
			ol.apply(t, ol.udpPlan(t))
			if h := ol.captureUDP(t, c, big); !h.routed(ol.brMAC) || h.frames < 3 {
				t.Errorf("with UDP intercepted the fragments reached the server as %v; want 3 or more routed (box MAC %s, TTL %d)", h, ol.brMAC, clientTTL-1)
			}
			// Only fragments: the same flow's small datagram is bridged.
			if h := ol.captureUDP(t, c, []byte("small")); !h.bridged(ol.ClientMAC) {
				t.Errorf("with UDP intercepted an unfragmented datagram to another port reached the server as %v; want bridged (client MAC %s, TTL %d)", h, ol.ClientMAC, clientTTL)
			}
		})
	}
}

// transparentUDP opens a transparent UDP socket of addr's family in the box
// on port, like the proxy's listener (without the proxy).
func (ol *overloadLab) transparentUDP(t *testing.T, addr netip.Addr, port uint16) *net.UDPConn {
	t.Helper()
	network, level, opt := "udp4", unix.SOL_IP, unix.IP_TRANSPARENT
	if addr.Is6() {
		network, level, opt = "udp6", unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, 1) })
		return errors.Join(err, serr)
	}}
	var c *net.UDPConn
	if err := ol.Box.Do(func() error {
		pc, err := lc.ListenPacket(t.Context(), network, net.JoinHostPort(addr.String(), fmt.Sprint(port)))
		if err == nil {
			c = pc.(*net.UDPConn)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestUDPPlanTProxiesReassembledDatagrams: a fragmented datagram to an
// intercepted port reaches the UDP listener whole: the bridge lifts every
// fragment, the box reassembles them before the inet table, and tproxy
// hands the datagram to the transparent socket on ProxyUDPPort.
func TestUDPPlanTProxiesReassembledDatagrams(t *testing.T) {
	ol := newOverloadLab(t)
	p := ol.udpPlan(t)
	ol.apply(t, p)
	h, err := ol.Box.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := p.Routing().Apply(h); err != nil {
		t.Fatalf("policy routing in the box: %v", err)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 250)
	for _, tt := range []struct {
		server, any netip.Addr
	}{{ol.ServerIP4, netip.IPv4Unspecified()}, {ol.ServerIP6, netip.IPv6Unspecified()}} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[tt.server.Is6()], func(t *testing.T) {
			ln := ol.transparentUDP(t, tt.any, p.cfg.ProxyUDPPort)
			c := ol.udpClient(t, tt.server, labUDPPort)
			if _, err := c.Write(big); err != nil {
				t.Fatal(err)
			}
			if err := ln.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 65536)
			n, from, err := ln.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("the UDP listener got nothing: %v", err)
			}
			if want := c.LocalAddr().(*net.UDPAddr).AddrPort(); n != len(big) || from.Addr().Unmap() != want.Addr() || from.Port() != want.Port() {
				t.Errorf("the UDP listener got %d bytes from %s; want %d from the client, %s", n, from, len(big), want)
			}
		})
	}
}
