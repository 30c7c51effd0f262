package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// The server sees the client's port too (issue 15): the proxy's upstream
// connection binds the client's address and port, and falls back to a
// port of the kernel's only when the box holds that 4-tuple already.

// clientPortBox runs the proxy on port 80 with debug logs (the fallback's
// line) and the metrics endpoint, and a peer-reporting server on the
// server's v4 and v6 addresses.
func clientPortBox(t *testing.T) *lab.Appliance {
	t.Helper()
	needRoot(t)
	l := lab.NewT(t)
	b, err := lab.NewAppliance(l, ghostwireBin, t.TempDir(), []int{80},
		"log:\n  level: debug\nmetrics:\n  listen: "+metricsAddr+"\n")
	if err != nil {
		t.Fatal(err)
	}
	applyAndRun(t, b)
	for _, f := range families(b) {
		listenServer(t, b, f.server, "80", peerServer)
	}
	return b
}

// Over 50 connections per family through the proxy, the server's peer is
// the client's own address and port, and no connection needed a fallback.
func TestClientPortSeenByServer(t *testing.T) {
	b := clientPortBox(t)
	const n = 50
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			addr := net.JoinHostPort(f.server, "80")
			for i := range n {
				peer, local, err := probe(b, addr, 10*time.Second)
				if err != nil {
					t.Fatalf("connection %d: %v", i, err)
				}
				if peer != local.String() {
					t.Fatalf("connection %d: the server saw %s, the client was %s", i, peer, local)
				}
				// Relayed, not bridged: the proxy logged this client socket.
				waitConnLog(t, b, local)
			}
		})
	}
	if got := portFallbacks(t, b); got != 0 {
		t.Errorf("PortFallbacks = %d after %d connections from fresh ports, want 0", got, 2*n)
	}
}

// The TIME_WAIT trap. A client's connection that the client closes first
// leaves the box's upstream socket in TIME_WAIT (the proxy passed the
// client's FIN on first). When the client then reuses its port for the
// same server, the box still holds that 4-tuple: with timestamps on the
// old connection the kernel recycles the TIME_WAIT and the port is kept;
// with a server that does no timestamps connect fails
// with EADDRNOTAVAIL, and the proxy must connect from another port at once
// and count it, not fail the connection.
func TestClientPortTimeWaitTrap(t *testing.T) {
	b := clientPortBox(t)
	port := uint16(40000)
	for _, f := range families(b) {
		for _, ts := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/server timestamps %v", f.name, ts), func(t *testing.T) {
				if !ts {
					b.Lab.Server.SysctlT(t, "net.ipv4.tcp_timestamps", "0")
				}
				port++
				client := netip.AddrPortFrom(netip.MustParseAddr(f.client), port)
				server := netip.AddrPortFrom(netip.MustParseAddr(f.server), 80)

				peer, _ := probeFromPort(t, b, client, server)
				if peer != client.String() {
					t.Fatalf("first connection: the server saw %s, want the client's %s", peer, client)
				}
				waitConnLog(t, b, net.TCPAddrFromAddrPort(client))
				if tw := timeWait(t, b.Lab.Box, client, server); tw == "" {
					t.Fatalf("the box holds no TIME_WAIT from %s to %s", client, server)
				}
				// The client's own TIME_WAIT of the 4-tuple would stop it
				// from reusing the port (it has no timestamps either when
				// the server does none): drop it, as a client with a shorter
				// TIME_WAIT, or another host behind the same NAT, would
				// not have it.
				sh(t, b.Lab.Client, "ss", "-K", "-tn", "state", "time-wait", "src", client.String(), "dst", server.String())
				if tw := timeWait(t, b.Lab.Client, client, server); tw != "" {
					t.Fatalf("the client still holds its TIME_WAIT: %s", tw)
				}

				before := portFallbacks(t, b)
				logged := len(b.ProxyLog("client port not kept"))
				peer, _ = probeFromPort(t, b, client, server)
				after := portFallbacks(t, b)
				if ts {
					if peer != client.String() {
						t.Errorf("second connection: the server saw %s, want the client's %s (TIME_WAIT recycled)", peer, client)
					}
					if after != before {
						t.Errorf("PortFallbacks went from %d to %d, want no fallback", before, after)
					}
					return
				}
				host, p, err := net.SplitHostPort(peer)
				if err != nil || host != client.Addr().String() || p == fmt.Sprint(client.Port()) {
					t.Errorf("second connection: the server saw %s, want %s with another port", peer, client.Addr())
				}
				if after != before+1 {
					t.Errorf("PortFallbacks went from %d to %d, want one more", before, after)
				}
				lines := b.ProxyLog("client port not kept")
				if len(lines) != logged+1 {
					t.Fatalf("%d \"client port not kept\" log lines, want %d", len(lines), logged+1)
				}
				l := lines[len(lines)-1]
				if l["level"] != "DEBUG" || l["client"] != client.String() || l["server"] != server.String() ||
					!strings.Contains(fmt.Sprint(l["reason"]), syscall.EADDRNOTAVAIL.Error()) {
					t.Errorf("fallback log line = %v", l)
				}
			})
		}
	}

	// Both families' no-timestamp runs fell back once each, and every
	// view of the counter says so.
	const want = 2
	if got := portFallbacks(t, b); got != want {
		t.Errorf("status --json: PortFallbacks = %d, want %d", got, want)
	}
	out, _, err := b.StatusOutput()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, fmt.Sprintf(", %d client ports not kept", want)) {
		t.Errorf("status does not count the fallbacks:\n%s", out)
	}
	if _, samples := scrape(t, b, metricsAddr); samples["ghostwire_port_fallbacks_total"] != want {
		t.Errorf("ghostwire_port_fallbacks_total = %v, want %d", samples["ghostwire_port_fallbacks_total"], want)
	}
	if st := proxyStats(t, b); st["port_fallbacks"] != float64(want) {
		t.Errorf("stats line: port_fallbacks = %v, want %d", st["port_fallbacks"], want)
	}
}

// probeFromPort is probe from the client's address local (SO_REUSEADDR, as a
// client that reuses its port would set) to server.
func probeFromPort(t *testing.T, b *lab.Appliance, local, server netip.AddrPort) (peer string, self net.Addr) {
	t.Helper()
	var c net.Conn
	if err := b.Lab.Client.Do(func() (err error) {
		d := net.Dialer{
			LocalAddr: net.TCPAddrFromAddrPort(local),
			Timeout:   10 * time.Second,
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
				}); err != nil {
					return err
				}
				return serr
			},
		}
		c, err = d.Dial("tcp", server.String())
		return err
	}); err != nil {
		t.Fatalf("connecting from %s to %s: %v", local, server, err)
	}
	peer, self, err := probeOver(c.(*net.TCPConn), 10*time.Second)
	if err != nil {
		t.Fatalf("exchange from %s: %v", local, err)
	}
	return peer, self
}

// timeWait is ns's TIME_WAIT sockets from local to remote, as ss prints
// them ("" if none).
func timeWait(t *testing.T, ns *lab.NS, local, remote netip.AddrPort) string {
	t.Helper()
	return strings.TrimSpace(sh(t, ns, "ss", "-Htn", "state", "time-wait", "src", local.String(), "dst", remote.String()))
}

// portFallbacks is the proxy's PortFallbacks counter, from status --json.
func portFallbacks(t *testing.T, b *lab.Appliance) uint64 {
	t.Helper()
	out, _, err := b.StatusOutput("--json")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Proxy *struct{ PortFallbacks *uint64 }
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Proxy == nil || st.Proxy.PortFallbacks == nil {
		t.Fatalf("status --json has no proxy.PortFallbacks: %v\n%s", err, out)
	}
	return *st.Proxy.PortFallbacks
}
