// Command ghostwire-lab runs ghostwire's demo in a client–box–server lab of network namespaces.
//
//	ghostwire-lab demo [-ghostwire bin/ghostwire] [-invisible]
//
// For each proxied connection the demo shows what each party saw, on the
// wire too: the client's MAC, IP and port as the client sent them, the
// MAC, IP and port the server's link carried and the server's own accept
// saw, and the MAC and address the reply reached the client with. With a
// visible box the frames between the box and the hosts carry the box's
// MAC; -invisible provisions the box with bridge.invisible (issue 15) and
// then no frame on either link may.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

func main() {
	fs := flag.NewFlagSet("ghostwire-lab demo", flag.ExitOnError)
	bin := fs.String("ghostwire", "bin/ghostwire", "ghostwire binary to provision and run the box with")
	invisible := fs.Bool("invisible", false, "provision the box with bridge.invisible: true (no address on the bridge, routes only;"+
		" the lab's box ports without IPv6) and check that no frame on either link carries a MAC of the box")
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fmt.Fprintln(os.Stderr, "usage: ghostwire-lab demo [-ghostwire bin/ghostwire] [-invisible]")
		os.Exit(2)
	}
	fs.Parse(os.Args[2:])
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "ghostwire-lab: the demo builds network namespaces: run it as root (sudo make demo)")
		os.Exit(1)
	}
	if err := demo(*bin, *invisible); err != nil {
		fmt.Fprintf(os.Stderr, "\nDEMO FAILED: %v\n", err)
		os.Exit(1)
	}
	if *invisible {
		fmt.Println("\nDEMO OK: the server saw the client, the client saw the server, the box proxied both," +
			" and no frame on either link carried a MAC of the box.")
		return
	}
	fmt.Println("\nDEMO OK: the server saw the client, the client saw the server, the box proxied both.")
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func demo(bin string, invisible bool) (err error) {
	abs, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	var opts []lab.Option
	if invisible {
		// An invisible box's OS brings its ports up without IPv6: a port
		// with IPv6 says MLD and router solicitations from its own MAC.
		opts = append(opts, lab.WithSilentPorts())
	}
	l, err := lab.New(lab.UniquePrefix(), opts...)
	if err != nil {
		return fmt.Errorf("building the lab: %w", err)
	}
	defer l.Close()
	// Ctrl-C must not leave namespaces behind.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() { <-sigs; l.Close(); os.Exit(130) }()

	dir, err := os.MkdirTemp("", "ghostwire-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b, err := lab.NewAppliance(l, abs, dir, []int{80}, "")
	if err != nil {
		return err
	}
	if invisible {
		if err := b.MakeInvisible(); err != nil {
			return err
		}
	}
	step("lab: client %s / %s ── [box: %s + %s] ── server %s / %s (namespaces %s-*)",
		l.ClientIP4, l.ClientIP6, l.ClientNIC, l.ServerNIC, l.ServerIP4, l.ServerIP6, l.Prefix)
	if invisible {
		fmt.Printf("box: invisible (bridge.invisible: true): no address on %s, only routes to %s and %s\n", b.Bridge, l.Subnet4, l.Subnet6)
	} else {
		fmt.Printf("box: visible: %s gets the addresses %s and %s (run with -invisible for an invisible box)\n", b.Bridge, l.BoxIP4, l.BoxIP6)
	}

	step("ghostwire apply -c %s", b.Config)
	out, err := b.Ghostwire("apply")
	fmt.Print(out)
	if err != nil {
		return err
	}
	defer func() {
		step("teardown")
		if b.Proxy != nil {
			b.StopProxy(syscall.SIGTERM)
		}
		out, terr := b.Ghostwire("teardown")
		fmt.Print(out)
		if err == nil {
			err = terr
		}
	}()

	step("ghostwire run (in the box namespace)")
	if err := b.StartProxy(); err != nil {
		return err
	}
	st, _ := b.Ghostwire("status")
	fmt.Print(st)

	step("server: HTTP on port 80 in the server namespace, answering with the peer address it sees")
	srv, err := startWhoAmI(l)
	if err != nil {
		return err
	}
	defer srv.Close()

	macs, err := macsOf(b)
	if err != nil {
		return err
	}
	step("MACs")
	for _, m := range []net.HardwareAddr{l.ClientMAC, l.ServerMAC, macs.bridge, macs.serverPort} {
		fmt.Printf("%s  %s\n", m, macs.whose(m))
	}
	fmt.Printf("(the bridge has its client port %s's MAC)\n", l.ClientNIC)

	var said wire
	for _, server := range []string{l.ServerIP4.String(), "[" + l.ServerIP6.String() + "]"} {
		want := l.ClientIP4.String()
		if strings.HasPrefix(server, "[") {
			want = l.ClientIP6.String()
		}
		w, err := request(b, macs, server, want)
		if err != nil {
			return err
		}
		said.add(w)
	}

	step("frames the box sent with a MAC of its own, while the requests ran")
	fmt.Printf("client link: %d of %d frames\nserver link: %d of %d frames\n", said.clientBox, said.client, said.serverBox, said.server)
	if invisible {
		if said.clientBox+said.serverBox > 0 {
			return fmt.Errorf("the invisible box sent %d frame(s) with its own MAC", said.clientBox+said.serverBox)
		}
		fmt.Println("(invisible: every frame of the box's went out under the MACs of the hosts it speaks for)")
	} else {
		fmt.Println("(visible: the box's side of each connection is sent from its own MAC; -invisible hides it)")
	}

	step("ghostwire status (the rules that matched%s)", map[bool]string{true: ": in the netdev table, learning and rewriting", false: ""}[invisible])
	st, _ = b.Ghostwire("status")
	fmt.Print(st)
	return nil
}

// boxMACs are the MACs of the box: its bridge's (which is its client
// port's: the bridge takes it) and its server port's.
type boxMACs struct {
	lab                *lab.Lab
	bridgeName         string
	bridge, serverPort net.HardwareAddr
}

func macsOf(b *lab.Appliance) (boxMACs, error) {
	m := boxMACs{lab: b.Lab, bridgeName: b.Bridge}
	err := b.Lab.Box.Do(func() error {
		for _, x := range []struct {
			name string
			mac  *net.HardwareAddr
		}{{b.Bridge, &m.bridge}, {b.Lab.ServerNIC, &m.serverPort}} {
			ifi, err := net.InterfaceByName(x.name)
			if err != nil {
				return err
			}
			*x.mac = ifi.HardwareAddr
		}
		return nil
	})
	if err != nil {
		return m, fmt.Errorf("reading the box's MACs: %w", err)
	}
	return m, nil
}

// isBox says whether mac is one of the box's.
func (m boxMACs) isBox(mac net.HardwareAddr) bool {
	return bytes.Equal(mac, m.bridge) || bytes.Equal(mac, m.serverPort)
}

// whose names mac's owner for the reader.
func (m boxMACs) whose(mac net.HardwareAddr) string {
	switch {
	case bytes.Equal(mac, m.lab.ClientMAC):
		return "the client's"
	case bytes.Equal(mac, m.lab.ServerMAC):
		return "the server's"
	case bytes.Equal(mac, m.bridge):
		return "THE BOX's: bridge " + m.bridgeName
	case bytes.Equal(mac, m.serverPort):
		return "THE BOX's: port " + m.lab.ServerNIC
	}
	return "someone else's"
}

// wire counts the frames two captures saw, and those with a box MAC as
// source.
type wire struct{ client, clientBox, server, serverBox int }

func (w *wire) add(o wire) {
	w.client += o.client
	w.clientBox += o.clientBox
	w.server += o.server
	w.serverBox += o.serverBox
}

// request makes one HTTP request from the client namespace and shows what
// each party saw: the client, the server's accept, the proxy's log, and
// the connection's first frames on each host's own link.
func request(b *lab.Appliance, macs boxMACs, server, wantPeer string) (w wire, err error) {
	l := b.Lab
	step("client: GET http://%s/", server)
	// Each host's own interface: the client's sees what it sends and what
	// reaches it, the server's what reaches the server.
	onClient, err := l.Client.CaptureHeaders(l.ClientIf)
	if err != nil {
		return w, err
	}
	defer onClient.Stop()
	onServer, err := l.Server.CaptureHeaders(l.ServerIf)
	if err != nil {
		return w, err
	}
	defer onServer.Stop()

	c, err := lab.Dial(l.Client, "tcp", server+":80", 5*time.Second)
	if err != nil {
		return w, fmt.Errorf("client connect to %s: %w", server, err)
	}
	defer c.Close()
	req := fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", server)
	fmt.Printf("client sent:     %q\n", req)
	fmt.Printf("client socket:   %s -> %s (the client talks to the server's address)\n", c.LocalAddr(), c.RemoteAddr())
	if _, err := io.WriteString(c, req); err != nil {
		return w, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return w, fmt.Errorf("reading response from %s: %w", server, err)
	}
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("client received: %s %q\n", resp.Status, body)
	peer := strings.TrimSpace(strings.TrimPrefix(string(body), "you are "))
	host, _, _ := net.SplitHostPort(peer)
	fmt.Printf("server saw peer: %s (client is %s)\n", peer, wantPeer)
	if host != wantPeer {
		return w, fmt.Errorf("server saw %s, not the client's address %s", peer, wantPeer)
	}
	c.Close()
	var line lab.LogLine
	err = lab.WaitFor(5*time.Second, func() (bool, error) {
		ls := b.ConnLogFor(c.LocalAddr())
		if len(ls) > 0 {
			line = ls[0]
		}
		return len(ls) > 0, nil
	})
	if err != nil {
		return w, fmt.Errorf("no proxy log line for %s: %w\nproxy stderr:\n%s", c.LocalAddr(), err, b.Proxy.Stderr())
	}
	dur, _ := line["duration"].(float64) // slog's JSON writes durations in nanoseconds
	fmt.Printf("proxy log:       client=%v server=%v bytes_up=%v bytes_down=%v duration=%v reason=%v\n",
		line["client"], line["server"], line["bytes_up"], line["bytes_down"], time.Duration(dur).Round(time.Microsecond), line["reason"])

	// The proxy logged the close, so both sides' last frames are out.
	clientFrames, err := onClient.Stop()
	if err != nil {
		return w, err
	}
	serverFrames, err := onServer.Stop()
	if err != nil {
		return w, err
	}
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	dst := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	seen, err := netip.ParseAddrPort(peer)
	if err != nil {
		return w, fmt.Errorf("the server's answer %q: %w", peer, err)
	}
	fmt.Println("on the wire (the connection's handshake, captured on each host's own interface):")
	for _, x := range []struct {
		what     string
		frames   []lab.Frame
		src, dst netip.AddrPort
		flags    uint8
	}{
		{"client link, as the client sent it:   ", clientFrames, client, dst, lab.TCPFlagSYN},
		{"server link, as the server got it:    ", serverFrames, seen, dst, lab.TCPFlagSYN},
		{"client link, the reply as it arrived: ", clientFrames, dst, client, lab.TCPFlagSYN | lab.TCPFlagACK},
	} {
		f, ok := findTCP(x.frames, x.src, x.dst, x.flags)
		if !ok {
			return w, fmt.Errorf("%s no %s frame %s -> %s among %d captured", strings.TrimSpace(x.what), flagName(x.flags), x.src, x.dst, len(x.frames))
		}
		fmt.Printf("  %s %-7s src MAC %s (%s)  %s -> %s\n", x.what, flagName(x.flags), f.Ethernet.Source, macs.whose(f.Ethernet.Source),
			netip.AddrPortFrom(f.Src, f.SrcPort), netip.AddrPortFrom(f.Dst, f.DstPort))
	}
	fmt.Printf("  the server's accept:                   peer %s\n", seen)
	w = wire{client: len(clientFrames), server: len(serverFrames)}
	for _, f := range clientFrames {
		if f.Ethernet != nil && macs.isBox(f.Ethernet.Source) {
			w.clientBox++
		}
	}
	for _, f := range serverFrames {
		if f.Ethernet != nil && macs.isBox(f.Ethernet.Source) {
			w.serverBox++
		}
	}
	return w, nil
}

// findTCP finds the first TCP frame from src to dst whose SYN and ACK
// flags are exactly flags'.
func findTCP(frames []lab.Frame, src, dst netip.AddrPort, flags uint8) (lab.Frame, bool) {
	for _, f := range frames {
		if f.Ethernet == nil || f.Proto != lab.ProtoTCP || f.TCPFlags&(lab.TCPFlagSYN|lab.TCPFlagACK) != flags {
			continue
		}
		if netip.AddrPortFrom(f.Src, f.SrcPort) == src && netip.AddrPortFrom(f.Dst, f.DstPort) == dst {
			return f, true
		}
	}
	return lab.Frame{}, false
}

func flagName(flags uint8) string {
	if flags&lab.TCPFlagACK != 0 {
		return "SYN-ACK"
	}
	return "SYN"
}

type whoAmI struct{ lns []net.Listener }

func startWhoAmI(l *lab.Lab) (*whoAmI, error) {
	w := &whoAmI{}
	h := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(rw, "you are %s\n", r.RemoteAddr)
	})
	for _, addr := range []string{l.ServerIP4.String() + ":80", "[" + l.ServerIP6.String() + "]:80"} {
		ln, err := lab.Listen(l.Server, "tcp", addr)
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("server listen %s: %w", addr, err)
		}
		w.lns = append(w.lns, ln)
		go http.Serve(ln, h)
	}
	return w, nil
}

func (w *whoAmI) Close() {
	for _, ln := range w.lns {
		ln.Close()
	}
}
