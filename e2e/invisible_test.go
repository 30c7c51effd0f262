package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/ethernet"

	"github.com/ghostwire/ghostwire/lab"
)

// invisibleBox is a lab box configured with bridge.invisible and, as an
// invisible box should be, no address on the wire: only routes to the
// segment. Nothing is applied yet, so a test can capture from before the
// bridge exists.
func invisibleBox(t *testing.T, ports ...int) *lab.Appliance {
	t.Helper()
	return invisibleBoxWith(t, nil, ports...)
}

// invisibleBoxWith is invisibleBox with extra keys in the bridge: section
// (e.g. "neighbour_timeout: 2s").
func invisibleBoxWith(t *testing.T, bridgeKeys []string, ports ...int) *lab.Appliance {
	t.Helper()
	needRoot(t)
	b, err := lab.NewAppliance(lab.NewT(t, lab.WithSilentPorts()), ghostwireBin, t.TempDir(), ports, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.MakeInvisible(bridgeKeys...); err != nil {
		t.Fatal(err)
	}
	return b
}

// boxMACs are the MACs of the box's ports (the bridge takes the client
// port's).
func boxMACs(t *testing.T, b *lab.Appliance) map[string]bool {
	t.Helper()
	macs := map[string]bool{}
	err := b.Lab.Box.Do(func() error {
		for _, n := range []string{b.Lab.ClientNIC, b.Lab.ServerNIC} {
			ifi, err := net.InterfaceByName(n)
			if err != nil {
				return err
			}
			macs[ifi.HardwareAddr.String()] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return macs
}

// boxSpeech lists frames the box said itself: any frame with a box MAC as
// Ethernet source, and ARP whose sender hardware address is the box's.
func boxSpeech(frames []lab.Frame, box map[string]bool) []lab.Frame {
	var out []lab.Frame
	for _, f := range frames {
		e := f.Ethernet
		if e == nil {
			continue
		}
		if box[e.Source.String()] {
			out = append(out, f)
			continue
		}
		// ARP for Ethernet/IPv4: the sender hardware address is 8 bytes in.
		if e.EtherType == ethernet.EtherTypeARP && len(e.Payload) >= 14 && box[net.HardwareAddr(e.Payload[8:14]).String()] {
			out = append(out, f)
		}
	}
	return out
}

// Requirement 1 and 4 of invisibility: across 200 HTTP requests (a new
// connection each), a 64 MiB transfer each way and UDP sessions, v4 and
// v6, no frame on either link has a box MAC as source (so no ARP, NDP, MLD
// or IGMP of the box's either, from before the bridge existed), every
// frame reaching a host carries the far host's MAC, and every connection
// was proxied with the client's port.
func TestInvisibleWire(t *testing.T) {
	b := invisibleBox(t, 80, 82)
	const udpPort = 5300
	cfg, err := readFile(b.Config)
	if err != nil {
		t.Fatal(err)
	}
	tcpPorts := regexp.MustCompile(`(?m)^  tcp_ports: .*$`)
	if err := writeFile(b.Config, tcpPorts.ReplaceAllStringFunc(cfg, func(l string) string {
		return fmt.Sprintf("%s\n  udp_ports: [%d]", l, udpPort)
	})); err != nil {
		t.Fatal(err)
	}
	capClient, err := b.Lab.Client.CaptureHeaders(b.Lab.ClientIf)
	if err != nil {
		t.Fatal(err)
	}
	capServer, err := b.Lab.Server.CaptureHeaders(b.Lab.ServerIf)
	if err != nil {
		capClient.Stop()
		t.Fatal(err)
	}
	applyAndRun(t, b)
	const requests, size = 200, 64 << 20
	clientPorts := map[uint16]bool{} // every TCP port the client used
	for _, f := range families(b) {
		url := "http://" + listenHTTPPeer(t, b, f.server, "80") + "/"
		for i := range requests {
			body, local, err := httpGetFrom(b, url)
			if err != nil {
				t.Fatalf("%s request %d: %v", f.name, i, err)
			}
			// The server saw the client's address and port: the
			// proxy kept both (no fallback is expected in a fresh lab).
			if want := "peer=" + local.String() + "\n"; body != want {
				t.Errorf("%s request %d: server said %q, want %q", f.name, i, body, want)
			}
			clientPorts[uint16(local.(*net.TCPAddr).Port)] = true
		}
		echo := udpEchoServer(t, b, f.server, udpPort)
		for i := range 20 {
			c := newUDPClient(t, b, netip.MustParseAddr(f.client))
			rep, err := c.exchange(echo.addr, []byte(fmt.Sprintf("datagram %d", i)), 5*time.Second)
			if err != nil {
				t.Fatalf("%s UDP session %d: %v", f.name, i, err)
			}
			if rep.peer != c.local.String() || rep.from != echo.addr {
				t.Errorf("%s UDP session %d: the server saw %s (client %s), the reply came from %s", f.name, i, rep.peer, c.local, rep.from)
			}
		}
	}
	for _, f := range families(b) {
		clientPorts[bulkBothWays(t, b, f, size)] = true
	}
	onClient, err := capClient.Stop()
	if err != nil {
		t.Fatal(err)
	}
	onServer, err := capServer.Stop()
	if err != nil {
		t.Fatal(err)
	}
	box := boxMACs(t, b)
	for link, frames := range map[string][]lab.Frame{"client": onClient, "server": onServer} {
		said := boxSpeech(frames, box)
		if len(said) > 0 {
			t.Errorf("%s link: %d of %d frames came from the box, first: %v (src %s)", link, len(said), len(frames), said[0], said[0].Ethernet.Source)
		}
		t.Logf("%s link: %d frames, %d from the box", link, len(frames), len(said))
	}
	// Each frame arriving at a host carries the far host's MAC as source.
	wrongSource := func(frames []lab.Frame, from net.HardwareAddr, to net.HardwareAddr) int {
		n := 0
		for _, f := range frames {
			if f.Ethernet != nil && bytes.Equal(f.Ethernet.Destination, to) && !bytes.Equal(f.Ethernet.Source, from) {
				n++
			}
		}
		return n
	}
	if n := wrongSource(onClient, b.Lab.ServerMAC, b.Lab.ClientMAC); n > 0 {
		t.Errorf("client link: %d frames to the client without the server's MAC as source", n)
	}
	if n := wrongSource(onServer, b.Lab.ClientMAC, b.Lab.ServerMAC); n > 0 {
		t.Errorf("server link: %d frames to the server without the client's MAC as source", n)
	}
	// On the server's link, every TCP segment from the client carries a
	// port the client itself used (no connection fell back: a fresh lab
	// holds no 4-tuple the proxy could collide with).
	for _, f := range onServer {
		if f.Proto == lab.ProtoTCP && (f.Src == b.Lab.ClientIP4 || f.Src == b.Lab.ClientIP6) && !clientPorts[f.SrcPort] {
			t.Errorf("server link: %v has a source port the client never used", f)
			break
		}
	}
	// Every connection was the proxy's: its log has a line for each.
	if n := len(b.ProxyLog("connection closed")); n < 2*(requests+1) {
		t.Errorf("proxy logged %d closed connections, want at least %d", n, 2*(requests+1))
	}
}

// bulkBothWays moves size bytes each way at once through the box and
// checks both directions arrived intact.
func bulkBothWays(t *testing.T, b *lab.Appliance, f family, size int64) (clientPort uint16) {
	t.Helper()
	var got <-chan served
	addr := listenServer(t, b, f.server, "82", func(t *testing.T, ln net.Listener) { got = mirrorServer(t, ln, size) })
	c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc := drainAsync(c)
	sent, err := stream(c, size, 1)
	if err != nil {
		t.Fatalf("%s: client send: %v", f.name, err)
	}
	c.CloseWrite()
	r := <-rc
	s := <-got
	if r.err != nil || s.readErr != nil || s.writeErr != nil {
		t.Fatalf("%s: transfer errors: client read %v, server read %v, server write %v", f.name, r.err, s.readErr, s.writeErr)
	}
	if s.got != size || s.gotSHA != sent || r.n != size || r.sha != s.sentSHA {
		t.Errorf("%s: server got %d bytes (sha match %v), client got %d (sha match %v), want %d each way",
			f.name, s.got, s.gotSHA == sent, r.n, r.sha == s.sentSHA, size)
	}
	if s.peer != c.LocalAddr().String() {
		t.Errorf("%s: server saw peer %s, want the client's %s", f.name, s.peer, c.LocalAddr())
	}
	return uint16(c.LocalAddr().(*net.TCPAddr).Port)
}

// learned reports whether the box's map (lan4, wan4, lan6, wan6) holds ip.
func learned(t *testing.T, b *lab.Appliance, m string, ip string) bool {
	t.Helper()
	return learnedAs(t, b, m, ip) != ""
}

// learnedAs is the MAC the box's map m holds for ip ("" if none). nft
// lists an element as "IP expires 992ms : MAC".
func learnedAs(t *testing.T, b *lab.Appliance, m string, ip string) string {
	t.Helper()
	re := regexp.MustCompile(`(?:^|[ {,])` + regexp.QuoteMeta(ip) + `(?: expires \S+)? : ([0-9a-f:]{17})`)
	if mm := re.FindStringSubmatch(sh(t, b.Lab.Box, "nft", "list", "map", "netdev", "ghostwire", m)); mm != nil {
		return mm[1]
	}
	return ""
}

// What the box cannot know fails open, not closed (requirement 3): a
// connection whose neighbour entries expired goes on, whichever side
// speaks first after the expiry; a server that changes its MAC and
// announces it (gratuitous ARP, unsolicited NA) is reached at its new MAC
// at once.
func TestInvisibleNeighbours(t *testing.T) {
	b := invisibleBoxWith(t, []string{"neighbour_timeout: 1s"}, 80, 81)
	applyAndRun(t, b)
	maps := func(f family) (lan, wan string) {
		if f.name == "IPv6" {
			return "lan6", "wan6"
		}
		return "lan4", "wan4"
	}
	for _, f := range families(b) {
		t.Run(f.name+"/expired", func(t *testing.T) {
			lan, wan := maps(f)
			// The server echoes, and also speaks when told: after an
			// expiry the first frame can come from either side.
			speak := make(chan string)
			addr := listenServer(t, b, f.server, "80", func(t *testing.T, ln net.Listener) {
				serveConns(t, ln, func(c *net.TCPConn) {
					go func() {
						for msg := range speak {
							fmt.Fprintln(c, msg)
						}
					}()
					io.Copy(c, c)
				})
			})
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			defer close(speak)
			c.SetDeadline(time.Now().Add(30 * time.Second))
			rd := newLineReader(c)
			expire := func(stage string) {
				t.Helper()
				err := lab.WaitFor(10*time.Second, func() (bool, error) {
					return !learned(t, b, lan, f.client) && !learned(t, b, wan, f.server), nil
				})
				if err != nil {
					t.Fatalf("%s: the neighbour entries did not expire: %v", stage, err)
				}
			}
			fmt.Fprintln(c, "before")
			if got := rd.line(t); got != "before" {
				t.Fatalf("before expiry: echo %q", got)
			}
			if !learned(t, b, lan, f.client) || !learned(t, b, wan, f.server) {
				t.Fatalf("the box did not learn %s and %s from the traffic:\n%s", f.client, f.server,
					sh(t, b.Lab.Box, "nft", "list", "table", "netdev", "ghostwire"))
			}
			expire("client first")
			fmt.Fprintln(c, "client first")
			if got := rd.line(t); got != "client first" {
				t.Fatalf("after expiry, client first: echo %q", got)
			}
			expire("server first")
			speak <- "server first"
			if got := rd.line(t); got != "server first" {
				t.Fatalf("after expiry, server first: got %q", got)
			}
		})
	}

	t.Run("host never seen", func(t *testing.T) {
		// A second client address the box has never seen a frame of:
		// its SYN teaches the box what it needs to answer it.
		newcomer := client2.String()
		sh(t, b.Lab.Client, "ip", "addr", "add", newcomer+"/24", "dev", b.Lab.ClientIf, "nodad")
		if learned(t, b, "lan4", newcomer) {
			t.Fatalf("the box knows %s before it sent anything", newcomer)
		}
		addr := listenServer(t, b, b.Lab.ServerIP4.String(), "81", peerServer)
		before := snmpCounters(t, b.Lab.Client)["TcpRetransSegs"]
		peer, self, err := probeFrom(b, client2, addr)
		if err != nil || peer != self.String() || !viaProxy(t, b, self, addr) {
			t.Fatalf("first connection from %s: peer %s, %v, or not proxied", newcomer, peer, err)
		}
		// Answered the first time: the client retransmitted nothing (a
		// box that had to wait for a second frame would have let the
		// first SYN's answer drop).
		if n := snmpCounters(t, b.Lab.Client)["TcpRetransSegs"] - before; n != 0 {
			t.Errorf("the client retransmitted %d segments on its first connection", n)
		}
	})

	t.Run("announced MAC change", func(t *testing.T) {
		srv := b.Lab.Server
		for _, k := range []string{"net.ipv4.conf." + b.Lab.ServerIf + ".arp_notify", "net.ipv6.conf." + b.Lab.ServerIf + ".ndisc_notify"} {
			if err := srv.Sysctl(k, "1"); err != nil {
				t.Fatal(err)
			}
		}
		newMAC := "02:00:5e:10:00:42"
		capServer, err := b.Lab.Server.CaptureHeaders(b.Lab.ServerIf)
		if err != nil {
			t.Fatal(err)
		}
		sh(t, srv, "ip", "link", "set", "dev", b.Lab.ServerIf, "address", newMAC)
		for _, f := range families(b) {
			_, wan := maps(f)
			// The announcement replaces the entry at once (delete and
			// add); it does not wait for the old one to expire.
			err := lab.WaitFor(5*time.Second, func() (bool, error) {
				return learnedAs(t, b, wan, f.server) == newMAC, nil
			})
			if err != nil {
				t.Errorf("%s: the box did not learn the server's new MAC from its announcement: %v\n%s", f.name, err,
					sh(t, b.Lab.Box, "nft", "list", "map", "netdev", "ghostwire", wan))
				continue
			}
			addr := listenServer(t, b, f.server, "81", peerServer)
			if _, _, err := probe(b, addr, 5*time.Second); err != nil {
				t.Errorf("%s: a connection after the MAC change: %v", f.name, err)
			}
		}
		frames, err := capServer.Stop()
		if err != nil {
			t.Fatal(err)
		}
		toNew := 0
		for _, fr := range frames {
			if fr.Ethernet != nil && fr.Ethernet.Destination.String() == newMAC && fr.Proto == lab.ProtoTCP {
				toNew++
			}
		}
		if toNew == 0 {
			t.Errorf("no TCP frame reached the server's new MAC %s", newMAC)
		}
	})
}

// A server that changes its MAC without announcing it would be a black
// hole for an invisible box, which never asks the network: it keeps
// sending to the old MAC, and the proxy, answering as the server, keeps
// the client's stale neighbour entry confirmed. The proxy's connect then
// gets no answer; the box bridges that server's new connections for a
// while, the client finds the server's new MAC itself, the box learns it
// from the server's reply crossing it, and proxying resumes. (IPv4: a MAC
// change is silent there; IPv6's link-local handling may announce it.)
func TestInvisibleSilentMACChange(t *testing.T) {
	b := invisibleBoxWith(t, []string{"neighbour_timeout: 10s"}, 80)
	applyAndRun(t, b)
	// The client's neighbour timers, shorter than Linux's defaults (an
	// entry is reachable for 15-45 s after a confirmation): at most 7.5 s
	// and 1 s before probing, so that it re-resolves within the 10 s the
	// box bridges the server. Still longer than the 2 s between the
	// proxy's confirmations (each proxied attempt's handshake and ACK)
	// when nothing is done about it.
	for key, v := range map[string]string{"base_reachable_time_ms": "5000", "delay_first_probe_time": "1", "retrans_time_ms": "200"} {
		if err := b.Lab.Client.Sysctl("net.ipv4.neigh."+b.Lab.ClientIf+"."+key, v); err != nil {
			t.Fatal(err)
		}
	}
	server := b.Lab.ServerIP4.String()
	addr := listenServer(t, b, server, "80", peerServer)
	if _, local, err := probe(b, addr, 5*time.Second); err != nil || !viaProxy(t, b, local, addr) {
		t.Fatalf("before the change: %v, or not proxied", err)
	}
	const newMAC = "02:00:5e:10:00:43"
	sh(t, b.Lab.Server, "ip", "link", "set", "dev", b.Lab.ServerIf, "address", newMAC)
	changed := time.Now()

	var failed int
	err := lab.WaitFor(40*time.Second, func() (bool, error) {
		if _, _, err := probe(b, addr, 4*time.Second); err != nil {
			failed++
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("no connection to %s succeeded after its silent MAC change (%d failed): %v\n%s", server, failed, err,
			sh(t, b.Lab.Box, "nft", "list", "map", "netdev", "ghostwire", "wan4"))
	}
	t.Logf("reached again %s after the change, after %d failed connection(s)", time.Since(changed).Round(time.Millisecond), failed)
	if ls := b.ProxyLog("server did not answer: its new connections cross the bridge untouched for a while"); len(ls) == 0 || ls[0]["server"] != server {
		t.Errorf("the proxy did not log bypassing the unanswering server: %v", ls)
	}
	// The box learned the new MAC from the traffic, and proxies again.
	err = lab.WaitFor(30*time.Second, func() (bool, error) {
		if learnedAs(t, b, "wan4", server) != newMAC {
			return false, nil
		}
		_, local, err := probe(b, addr, 4*time.Second)
		return err == nil && viaProxy(t, b, local, addr), nil
	})
	if err != nil {
		t.Fatalf("not proxied again to the new MAC: %v\n%s", err, sh(t, b.Lab.Box, "nft", "list", "map", "netdev", "ghostwire", "wan4"))
	}
	t.Logf("proxied again, to the new MAC, %s after the change", time.Since(changed).Round(time.Millisecond))
}

// Requirement 5: the layer-2 tables live and die with the proxy. Killed,
// the box is a plain bridge again at once: frames cross untouched (TTL as
// the client sent it, no box in between) and the box still says nothing
// (the quiet table outlives the proxy). Teardown gives the ports and the
// box back exactly as they were, IPv6 on the ports included.
func TestInvisibleFailOpenAndTeardown(t *testing.T) {
	needRoot(t)
	// Ports with IPv6 on, as an ordinary box's: apply turns it off and
	// teardown must turn it back on.
	b := newBox(t, 80)
	if err := b.MakeInvisible(); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, b)
	applyAndRun(t, b)
	for _, port := range []string{b.Lab.ClientNIC, b.Lab.ServerNIC} {
		if v, err := b.Lab.Box.ReadSysctl("net.ipv6.conf." + port + ".disable_ipv6"); err != nil || v != "1" {
			t.Errorf("port %s: disable_ipv6 = %q, %v; want 1 while invisible", port, v, err)
		}
	}
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	if _, local, err := probe(b, addr, 5*time.Second); err != nil || !viaProxy(t, b, local, addr) {
		t.Fatalf("before the kill: %v, or not proxied", err)
	}
	// apply again changes nothing (and refuses nothing) on a running box.
	bridgeState := func() string {
		return sh(t, b.Lab.Box, "ip", "-br", "link", "show", "dev", b.Bridge) + sh(t, b.Lab.Box, "ip", "-br", "addr", "show", "dev", b.Bridge)
	}
	pre := bridgeState()
	if out, err := b.Ghostwire("apply"); err != nil {
		t.Fatalf("apply again: %v\n%s", err, out)
	}
	if post := bridgeState(); post != pre {
		t.Errorf("apply again changed the bridge:\n%s\n%s", pre, post)
	}
	// check says it is silent, and names what would make it speak.
	wantCheck(t, b, "invisible", 0, "OK   invisible: silent: "+b.Bridge+" has arp off")
	sh(t, b.Lab.Box, "ip", "link", "set", "dev", b.Bridge, "arp", "on")
	wantCheck(t, b, "arp on", 2, "FAIL invisible: bridge "+b.Bridge+" has ARP on (want arp off)", "ghostwire apply")
	sh(t, b.Lab.Box, "ip", "link", "set", "dev", b.Bridge, "arp", "off")

	if err := b.StopProxy(syscall.SIGKILL); err == nil {
		t.Fatal("SIGKILL reported a clean exit")
	}
	b.Proxy = nil
	if out := sh(t, b.Lab.Box, "nft", "list", "tables"); strings.Contains(out, "netdev ghostwire\n") || !strings.Contains(out, "netdev ghostwire_quiet") {
		t.Fatalf("after kill -9, tables:\n%s\nwant the quiet table only", out)
	}
	capServer, err := b.Lab.Server.CaptureHeaders(b.Lab.ServerIf)
	if err != nil {
		t.Fatal(err)
	}
	peer, local, err := probe(b, addr, 5*time.Second)
	if err != nil || peer != local.String() || viaProxy(t, b, local, addr) {
		t.Fatalf("after kill -9: peer %s local %v err %v, want bridged untouched", peer, local, err)
	}
	frames, err := capServer.Stop()
	if err != nil {
		t.Fatal(err)
	}
	var fromClient int
	for _, f := range frames {
		if f.Src != b.Lab.ClientIP4 || f.Proto != lab.ProtoTCP {
			continue
		}
		fromClient++
		if f.TTL != 64 || f.Ethernet.Source.String() != b.Lab.ClientMAC.String() {
			t.Errorf("after kill -9 the server got %v with TTL %d from %s: want the client's frame untouched (TTL 64, its MAC)", f, f.TTL, f.Ethernet.Source)
		}
	}
	if fromClient == 0 {
		t.Fatal("no frame from the client reached the server")
	}
	if said := boxSpeech(frames, boxMACs(t, b)); len(said) > 0 {
		t.Errorf("with the proxy dead the box said %d frames, first %v", len(said), said[0])
	}

	if out, err := b.Ghostwire("teardown"); err != nil {
		t.Fatalf("teardown: %v\n%s", err, out)
	}
	if after := snapshot(t, b); after != before {
		t.Errorf("teardown did not restore the box:\n--- before\n%s\n--- after\n%s", before, after)
	}
}

// listenHTTPPeer serves HTTP in the server namespace on host:port; every
// response is "peer=ADDR\n", the client address the server saw.
func listenHTTPPeer(t *testing.T, b *lab.Appliance, host, port string) string {
	t.Helper()
	addr := net.JoinHostPort(host, port)
	ln, err := lab.Listen(b.Lab.Server, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "peer=%s\n", r.RemoteAddr)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return addr
}

// httpGetFrom fetches url from the client namespace over a new connection,
// and says from which local address.
func httpGetFrom(b *lab.Appliance, url string) (string, net.Addr, error) {
	var local net.Addr
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			c, err := lab.Dial(b.Lab.Client, network, addr, 5*time.Second)
			if err != nil {
				return nil, err
			}
			local = c.LocalAddr()
			return c, nil
		},
	}}
	resp, err := client.Get(url)
	if err != nil {
		return "", nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), local, err
}
