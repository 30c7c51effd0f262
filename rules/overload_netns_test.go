package rules

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The overload plans on real traffic: a lab (client, box, server namespaces,
// unique per test) whose box bridges its two ports and has the diversion
// applied, with no proxy listening.

const (
	labPort   = 8080 // intercepted port the lab's server listens on
	clientTTL = 77   // TTL (hop limit) the client sends with: bridged frames keep it
)

type overloadLab struct {
	*lab.Lab
	nft   *nftables.Conn // into the box
	brMAC net.HardwareAddr
	plan  *Plan
}

// newOverloadLab builds the lab, bridges the box's ports as ghostwire does
// (bridge-nf-call off, forwarding on, an address on the bridge), and starts
// an echo server on labPort for IPv4 and IPv6.
func newOverloadLab(t *testing.T) *overloadLab {
	t.Helper()
	if testing.Short() {
		t.Skip("traffic test in network namespaces; skipped with -short")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skipf("needs nft to list the bypass sets: %v", err)
	}
	l := lab.NewT(t)
	br := l.Prefix + "br"
	// No DAD on the bridge the box is about to get (the kernel skips DAD
	// only if both "all" and the device say so): its link-local address,
	// which the box's neighbour solicitations come from, works at once.
	for _, key := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad", "net.ipv6.conf.default.router_solicitations"} {
		if err := l.Box.Sysctl(key, "0"); err != nil {
			t.Fatalf("setting %s in the box: %v", key, err)
		}
	}
	if err := l.PlainBridge(br); err != nil {
		t.Fatal(err)
	}
	for key, value := range map[string]string{
		"net.ipv4.ip_forward":                     "1",
		"net.ipv6.conf.all.forwarding":            "1",
		"net.ipv4.conf.all.send_redirects":        "0",
		"net.ipv4.conf." + br + ".send_redirects": "0",
	} {
		if err := l.Box.Sysctl(key, value); err != nil {
			t.Fatalf("setting %s in the box: %v", key, err)
		}
	}
	h, err := l.Box.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	link, err := h.LinkByName(br)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []netip.Prefix{l.BoxIP4, l.BoxIP6} {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}, Flags: unix.IFA_F_NODAD}
		if err := h.AddrAdd(link, addr); err != nil {
			t.Fatalf("adding %s to %s: %v", p, br, err)
		}
	}

	// IPv6 readiness: the box's neighbour solicitations come from the
	// bridge's link-local address, and the client's and server's answers
	// go to it over their own fe80::/64 route, which appears only once
	// the kernel has seen their carrier (up to a second after link up).
	waitLinkLocal(t, l.Box, br)
	waitLinkLocal(t, l.Client, l.ClientIf)
	waitLinkLocal(t, l.Server, l.ServerIf)

	ns, err := netns.GetFromPath(l.Box.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	ol := &overloadLab{Lab: l, nft: c, brMAC: link.Attrs().HardwareAddr}
	ol.plan = mustPlan(t, Config{
		Name: "ghostwire", Bridge: br, ClientPort: l.ClientNIC, ServerPort: l.ServerNIC, BridgeMAC: ol.brMAC,
		TCPPorts: []uint16{labPort}, ProxyTCPPort: 3129, Mark: 1, RouteTable: 100, RulePriority: 1000,
	})

	for _, addr := range []netip.Addr{l.ServerIP4, l.ServerIP6} {
		var ln net.Listener
		if err := l.Server.Do(func() (err error) {
			ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, labPort).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer conn.Close()
					_, _ = io.Copy(conn, conn)
				}()
			}
		}()
	}
	return ol
}

// waitLinkLocal waits (bounded) until ifname in ns has a usable IPv6
// link-local address.
func waitLinkLocal(t *testing.T, ns *lab.NS, ifname string) {
	t.Helper()
	h, err := ns.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		link, err := h.LinkByName(ifname)
		if err != nil {
			t.Fatalf("finding %s in %s: %v", ifname, ns.Name, err)
		}
		addrs, err := h.AddrList(link, netlink.FAMILY_V6)
		if err != nil {
			t.Fatalf("listing addresses of %s in %s: %v", ifname, ns.Name, err)
		}
		for _, a := range addrs {
			if a.IP.IsLinkLocalUnicast() && a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s in %s has no usable IPv6 link-local address after 5s: %v", ifname, ns.Name, addrs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (ol *overloadLab) apply(t *testing.T, p *Plan) {
	t.Helper()
	if err := p.Apply(ol.nft); err != nil {
		t.Fatal(err)
	}
	wantNoDrift(t, p, ol.nft)
}

// dial connects from the client with TTL (hop limit) clientTTL.
func (ol *overloadLab) dial(server netip.Addr, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout, Control: func(network, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if strings.HasSuffix(network, "6") {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, clientTTL)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, clientTTL)
			}
		})
		return errors.Join(err, serr)
	}}
	var conn net.Conn
	err := ol.Client.Do(func() (err error) {
		conn, err = d.Dial("tcp", netip.AddrPortFrom(server, labPort).String())
		return err
	})
	return conn, err
}

// roundTrip sends msg over conn and reads the echo back.
func roundTrip(conn net.Conn, msg string) error {
	if err := conn.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := io.WriteString(conn, msg); err != nil {
		return fmt.Errorf("writing %q: %w", msg, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("reading echo of %q: %w", msg, err)
	}
	if string(got) != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// hop is how the client's frames of one connection reached the server.
type hop struct {
	frames  int
	srcMACs map[string]int
	ttls    map[int]int
}

func (h hop) String() string {
	return fmt.Sprintf("%d frames, source MACs %v, TTLs %v", h.frames, h.srcMACs, h.ttls)
}

// kernelTTL is the TTL of what the client's kernel sends on its own
// behalf (a TIME_WAIT ACK, a reset), not with the socket's TTL.
const kernelTTL = 64

// bridged reports whether every frame kept the client's MAC and TTL (the
// socket's, or the kernel's own for its control frames).
func (h hop) bridged(clientMAC net.HardwareAddr) bool {
	return h.frames > 0 && len(h.srcMACs) == 1 && h.srcMACs[clientMAC.String()] == h.frames &&
		h.ttls[clientTTL] > 0 && h.ttls[clientTTL]+h.ttls[kernelTTL] == h.frames
}

// routed reports whether every frame came from the box's MAC one hop down.
func (h hop) routed(boxMAC net.HardwareAddr) bool {
	return h.frames > 0 && len(h.srcMACs) == 1 && h.srcMACs[boxMAC.String()] == h.frames &&
		h.ttls[clientTTL-1] > 0 && h.ttls[clientTTL-1]+h.ttls[kernelTTL-1] == h.frames
}

// capture records what the server receives while fn runs, and summarises
// the frames of the client's connection from local.
func (ol *overloadLab) capture(t *testing.T, local func() netip.AddrPort, fn func()) hop {
	t.Helper()
	var from netip.AddrPort
	return ol.captureFrames(t, func() { fn(); from = local() }, func(f lab.Frame) bool {
		return f.Proto == lab.ProtoTCP && f.Src == from.Addr() && f.SrcPort == from.Port() && f.DstPort == labPort
	})
}

// captureFrames records what the server receives while fn runs, and
// summarises the frames that keep selects.
func (ol *overloadLab) captureFrames(t *testing.T, fn func(), keep func(lab.Frame) bool) hop {
	t.Helper()
	capt, err := ol.Server.Capture(ol.ServerIf)
	if err != nil {
		t.Fatal(err)
	}
	fn()
	frames, err := capt.Stop()
	if err != nil {
		t.Fatal(err)
	}
	h := hop{srcMACs: map[string]int{}, ttls: map[int]int{}}
	for _, f := range frames {
		if !keep(f) {
			continue
		}
		ip := f.Ethernet.Payload
		ttl := int(ip[8]) // IPv4 TTL
		if f.Src.Is6() {
			ttl = int(ip[7]) // IPv6 hop limit
		}
		h.frames++
		h.srcMACs[f.Ethernet.Source.String()]++
		h.ttls[ttl]++
	}
	return h
}

func localAddr(conn *net.Conn) func() netip.AddrPort {
	return func() netip.AddrPort {
		if *conn == nil {
			return netip.AddrPort{}
		}
		return (*conn).LocalAddr().(*net.TCPAddr).AddrPort()
	}
}

// bypassSet lists the bypass set of the family of addr in the box.
func (ol *overloadLab) bypassSet(t *testing.T, addr netip.Addr) string {
	t.Helper()
	set := bypassSets.name(ipFamilies[0])
	if addr.Is6() {
		set = bypassSets.name(ipFamilies[1])
	}
	out, err := ol.Box.Command(t.Context(), "nft", "list", "set", "bridge", ol.plan.cfg.Name, set).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list set %s: %v: %s", set, err, out)
	}
	return string(out)
}

// flowElement is a bypass set element as nft lists it.
func flowElement(local netip.AddrPort, server netip.Addr) string {
	return fmt.Sprintf("%s . %s . %d . %d ", local.Addr(), server, local.Port(), labPort)
}

// TestOverloadBypassTraffic: while bypassing, a new connection crosses the
// bridge untouched and is recorded; after the overload it stays bridged. A
// new connection under the normal plan is routed through the box, which is
// what tells the two apart.
func TestOverloadBypassTraffic(t *testing.T) {
	ol := newOverloadLab(t)
	for _, server := range []netip.Addr{ol.ServerIP4, ol.ServerIP6} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[server.Is6()], func(t *testing.T) {
			ol.apply(t, ol.plan.Overloaded(OverloadBypass))
			var conn net.Conn
			h := ol.capture(t, localAddr(&conn), func() {
				var err error
				if conn, err = ol.dial(server, 5*time.Second); err != nil {
					t.Fatalf("connecting while bypassing: %v", err)
				}
				t.Cleanup(func() { conn.Close() })
				if err := roundTrip(conn, "during overload"); err != nil {
					t.Fatal(err)
				}
			})
			local := localAddr(&conn)()
			if !h.bridged(ol.ClientMAC) {
				t.Errorf("while bypassing, the server got %v; want all from client MAC %s with TTL %d (bridged)", h, ol.ClientMAC, clientTTL)
			}
			if set := ol.bypassSet(t, server); !strings.Contains(set, flowElement(local, server)) {
				t.Errorf("flow %s not in the bypass set:\n%s", flowElement(local, server), set)
			}

			ol.apply(t, ol.plan)
			h = ol.capture(t, localAddr(&conn), func() {
				if err := roundTrip(conn, "after overload"); err != nil {
					t.Fatalf("bypassed connection after the overload: %v", err)
				}
			})
			if !h.bridged(ol.ClientMAC) {
				t.Errorf("after the overload, the bypassed flow reached the server as %v; want bridged (client MAC %s, TTL %d)", h, ol.ClientMAC, clientTTL)
			}
			if set := ol.bypassSet(t, server); !strings.Contains(set, flowElement(local, server)) {
				t.Errorf("flow %s left the bypass set after the overload:\n%s", flowElement(local, server), set)
			}

			// Control: with no proxy listening, a new connection under
			// the normal plan is diverted, finds no socket and is routed.
			var fresh net.Conn
			h = ol.capture(t, localAddr(&fresh), func() {
				var err error
				if fresh, err = ol.dial(server, 5*time.Second); err != nil {
					t.Fatalf("connecting under the normal plan: %v", err)
				}
				defer fresh.Close()
				if err := roundTrip(fresh, "normal"); err != nil {
					t.Fatal(err)
				}
			})
			if !h.routed(ol.brMAC) {
				t.Errorf("a new connection under the normal plan reached the server as %v; want routed (box MAC %s, TTL %d)", h, ol.brMAC, clientTTL-1)
			}
			if set := ol.bypassSet(t, server); strings.Contains(set, flowElement(localAddr(&fresh)(), server)) {
				t.Errorf("a connection made under the normal plan was recorded as bypassed:\n%s", set)
			}
		})
	}
	if n, err := BypassedFlows(ol.nft, ol.plan.cfg.Name); err != nil || n != 2 {
		t.Errorf("BypassedFlows = %d, %v; want 2 (one IPv4, one IPv6)", n, err)
	}
}

// TestOverloadRefuseTraffic: while refusing, a new connection to an
// intercepted port is reset by the box at once, though the server listens;
// the normal plan lets the next one through.
func TestOverloadRefuseTraffic(t *testing.T) {
	ol := newOverloadLab(t)
	for _, server := range []netip.Addr{ol.ServerIP4, ol.ServerIP6} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[server.Is6()], func(t *testing.T) {
			ol.apply(t, ol.plan.Overloaded(OverloadRefuse))
			start := time.Now()
			conn, err := ol.dial(server, 5*time.Second)
			elapsed := time.Since(start)
			if err == nil {
				conn.Close()
				t.Fatal("connection accepted while refusing")
			}
			// A dropped SYN is first retransmitted after 1s: a reset
			// seen sooner answered the first SYN.
			if !errors.Is(err, syscall.ECONNREFUSED) || elapsed >= time.Second {
				t.Errorf("connecting while refusing: %v after %v; want ECONNREFUSED at once", err, elapsed)
			}
			if st, err := Tables(ol.nft, ol.plan.cfg.Name); err != nil || st.Overload != OverloadRefuse {
				t.Errorf("Tables = %+v, %v; want Overload refuse", st, err)
			}

			ol.apply(t, ol.plan)
			conn, err = ol.dial(server, 5*time.Second)
			if err != nil {
				t.Fatalf("connecting after the overload: %v", err)
			}
			defer conn.Close()
			if err := roundTrip(conn, "after overload"); err != nil {
				t.Fatal(err)
			}
		})
	}
}
