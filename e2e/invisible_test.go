package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"regexp"
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
	needRoot(t)
	b, err := lab.NewAppliance(lab.NewT(t, lab.WithSilentPorts()), ghostwireBin, t.TempDir(), ports, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := readFile(b.Config)
	if err != nil {
		t.Fatal(err)
	}
	addrs := regexp.MustCompile(`(?m)^  addresses: .*$`)
	if !addrs.MatchString(cfg) {
		t.Fatalf("harness config has no bridge addresses line:\n%s", cfg)
	}
	cfg = addrs.ReplaceAllLiteralString(cfg, fmt.Sprintf("  addresses: []\n  routes: [%q, %q]\n  invisible: true",
		b.Lab.BoxIP4.Masked(), b.Lab.BoxIP6.Masked()))
	if err := writeFile(b.Config, cfg); err != nil {
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

// Requirement 1 and 4 of invisibility: across 200 connections and a
// 64 MiB transfer each way, v4 and v6, no frame on either link has a box
// MAC as source (so no ARP, NDP, MLD or IGMP of the box's either, from
// before the bridge existed), every frame reaching a host carries the far
// host's MAC, and every connection was proxied with the client's port.
func TestInvisibleWire(t *testing.T) {
	b := invisibleBox(t, 80, 82)
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
	const conns, size = 200, 64 << 20
	for _, f := range families(b) {
		addr := listenServer(t, b, f.server, "80", peerServer)
		for i := range conns {
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatalf("%s connection %d: %v", f.name, i, err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err != nil {
				t.Fatalf("%s connection %d: reading the server's greeting: %v", f.name, i, err)
			}
			// The server saw the client's address and port: the
			// proxy kept both (no fallback is expected in a fresh lab).
			if want := "peer=" + c.LocalAddr().String() + "\n"; line != want {
				t.Errorf("%s connection %d: server said %q, want %q", f.name, i, line, want)
			}
		}
	}
	for _, f := range families(b) {
		bulkBothWays(t, b, f, size)
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
	// Every connection was the proxy's: its log has a line for each.
	if n := len(b.ProxyLog("connection closed")); n < 2*(conns+1) {
		t.Errorf("proxy logged %d closed connections, want at least %d", n, 2*(conns+1))
	}
}

// bulkBothWays moves size bytes each way at once through the box and
// checks both directions arrived intact.
func bulkBothWays(t *testing.T, b *lab.Appliance, f family, size int64) {
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
}
